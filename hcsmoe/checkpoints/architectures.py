"""Architectures as data: where each family keeps its MoE blocks, routers, experts and expert counts.

Every supported family in transformers 5 stores the routed experts of a layer as fused 3-D
parameters (`gate_up_proj`, `down_proj`, and for GPT-OSS their biases) on an `experts` module, and
the router as a module with one weight row (and bias or score-correction entry) per expert. What
differs between families is data: attribute names, the gate/up layout, the activation, what the
router module returns and how it scores experts, shared parts that stay untouched, and the config
keys holding the counts. An adapter only names those; all the work is generic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hcsmoe.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its MoE parts (dotted attribute paths) and how it routes."""

    name: str
    model_types: tuple[str, ...]
    count_keys: tuple[str, ...]  # config.json keys that hold the routed-expert count (new and legacy names)
    layers: str = "model.layers"
    moe_block: str = "mlp"  # relative to a decoder layer
    router: str = "gate"  # relative to the MoE block
    experts: str = "experts"  # relative to the MoE block
    shared: tuple[str, ...] = ()  # modules of a decoder layer left untouched (shared experts and their gates)
    top_k_key: str = "num_experts_per_tok"
    gate_up_interleaved: bool = False  # [g0, u0, g1, u1, ...] instead of [gate; up]
    transposed: bool = False  # gate_up_proj stored [E, H, 2I] (down_proj [E, I, H]) instead of [E, 2I, H]
    activation: str = "glu"  # key of ACTIVATIONS: how an expert turns gate and up into its intermediate
    routing: str = "softmax"  # key of ROUTINGS: what the router module returns and how experts are scored
    gate_on_input: bool = False  # the gate weight scales an expert's input, not its output (Llama 4)
    group_keys: tuple[str, str] | None = None  # config keys: expert groups, groups kept per token (DeepSeek)
    group_method: str | None = None  # config.topk_method that turns group-limited routing on; None: always on
    min_group_size: int = 1  # experts every group needs (DeepSeek-V3 scores a group by its best two)
    # config.json key of the routed experts' intermediate width (--width); None where the shared experts take
    # their width from the same key alone (Llama 4: intermediate_size)
    width_key: str | None = "intermediate_size"
    # config key that multiplies width_key into the shared experts' width (DeepSeek: moe_intermediate_size x
    # n_shared_experts): narrowing the routed experts to I2 multiplies it by I / I2, so the shared experts keep their
    # width, and I2 must divide I times it
    shared_count_key: str | None = None


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("Qwen3-MoE", ("qwen3_moe",), count_keys=("num_experts", "num_local_experts"),
                 width_key="moe_intermediate_size"),
    Architecture(
        "Qwen2-MoE",
        ("qwen2_moe",),
        count_keys=("num_experts",),
        shared=("mlp.shared_expert", "mlp.shared_expert_gate"),
        width_key="moe_intermediate_size",
    ),
    Architecture("Mixtral", ("mixtral",), count_keys=("num_local_experts",)),
    Architecture("OLMoE", ("olmoe",), count_keys=("num_experts",)),
    Architecture(
        "DeepSeek-V2",
        ("deepseek_v2",),
        count_keys=("n_routed_experts",),
        shared=("mlp.shared_experts",),
        group_keys=("n_group", "topk_group"),
        group_method="group_limited_greedy",
        width_key="moe_intermediate_size",
        shared_count_key="n_shared_experts",
    ),
    Architecture(
        "DeepSeek-V3",
        ("deepseek_v3",),
        count_keys=("n_routed_experts",),
        shared=("mlp.shared_experts",),
        routing="sigmoid",
        group_keys=("n_group", "topk_group"),
        min_group_size=2,
        width_key="moe_intermediate_size",
        shared_count_key="n_shared_experts",
    ),
    Architecture(
        "GPT-OSS",
        ("gpt_oss",),
        count_keys=("num_local_experts",),
        router="router",
        gate_up_interleaved=True,
        transposed=True,
        activation="clamped-swiglu",
    ),
    Architecture("Phi-MoE", ("phimoe",), count_keys=("num_local_experts",), router="router"),
    Architecture(
        "GraniteMoE", ("granitemoe",), count_keys=("num_local_experts",), moe_block="block_sparse_moe", router="router"
    ),
    Architecture(
        "GraniteMoeShared",
        ("granitemoeshared",),
        count_keys=("num_local_experts",),
        moe_block="block_sparse_moe",
        router="router",
        shared=("shared_mlp",),
    ),
    Architecture(
        "Llama 4",
        ("llama4_text",),
        count_keys=("num_local_experts",),
        moe_block="feed_forward",
        router="router",
        shared=("feed_forward.shared_expert",),
        transposed=True,
        routing="llama4",
        gate_on_input=True,
        width_key=None,
    ),
)


def supported_names() -> str:
    return ", ".join(f"{a.name} ({'/'.join(a.model_types)})" for a in ARCHITECTURES)


def architecture_for(config) -> Architecture:
    """The adapter for a config's model_type, or an error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    for architecture in ARCHITECTURES:
        if model_type in architecture.model_types:
            return architecture
    raise UserError(f"model type {model_type!r} is not a supported MoE architecture; supported: {supported_names()}")


def get_path(root: nn.Module, dotted: str) -> nn.Module | None:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


@dataclass
class MoELayer:
    """One MoE block of a loaded model, with handles on its router and fused experts."""

    index: int  # decoder layer index
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return self.router.weight.shape[0]


def decoder_layers(model: nn.Module, architecture: Architecture) -> nn.ModuleList:
    layers = get_path(model, architecture.layers)
    if layers is None:
        raise UserError(f"cannot find {architecture.layers} in this {architecture.name} model")
    return layers


def moe_layer_at(model: nn.Module, architecture: Architecture, index: int) -> MoELayer | None:
    """The MoE handles of decoder layer `index`, or None for a dense layer."""
    layer = decoder_layers(model, architecture)[index]
    block = get_path(layer, architecture.moe_block)
    router = get_path(block, architecture.router) if block is not None else None
    experts = get_path(block, architecture.experts) if block is not None else None
    if router is None or experts is None or not hasattr(experts, "gate_up_proj"):
        return None
    return MoELayer(index, block, router, experts)


def moe_layers(model: nn.Module, architecture: Architecture) -> list[MoELayer]:
    """The decoder layers whose MLP is a routed MoE block (dense layers, e.g. DeepSeek's first ones, are skipped)."""
    found = [moe_layer_at(model, architecture, i) for i in range(len(decoder_layers(model, architecture)))]
    found = [moe for moe in found if moe is not None]
    if not found:
        raise UserError(f"this {architecture.name} model has no MoE layers to compress")
    return found


def dense_layers(model: nn.Module, architecture: Architecture) -> list[int]:
    """Decoder layers with a plain MLP instead of routed experts; compression leaves them as they are."""
    moe = {m.index for m in moe_layers(model, architecture)}
    return [i for i in range(len(decoder_layers(model, architecture))) if i not in moe]


def shared_modules(model: nn.Module, architecture: Architecture) -> dict[str, nn.Module]:
    """Every shared module the model really has ('model.layers.3.mlp.shared_experts' -> module); left untouched."""
    found = {}
    for index, layer in enumerate(decoder_layers(model, architecture)):
        for path in architecture.shared:
            module = get_path(layer, path)
            if module is not None:
                found[f"{architecture.layers}.{index}.{path}"] = module
    return found


def top_k(config, architecture: Architecture) -> int:
    return int(getattr(config, architecture.top_k_key))


def expert_count(config, architecture: Architecture) -> int:
    return int(getattr(config, architecture.count_keys[0]))


def set_expert_count(config, architecture: Architecture, count: int) -> None:
    """Write the new routed-expert count under every key the family's config classes read."""
    for key in architecture.count_keys:
        setattr(config, key, count)


# Module attributes caching the routed experts' intermediate width (fused experts: intermediate_dim; GPT-OSS:
# intermediate_size; Llama 4: expert_dim and intermediate_size).
WIDTH_ATTRIBUTES = ("intermediate_dim", "intermediate_size", "expert_dim")


def expert_width(experts: nn.Module, architecture: Architecture) -> int:
    """I: the routed experts' intermediate width, from down_proj's shape."""
    return int(experts.down_proj.shape[1 if architecture.transposed else 2])


def shared_width(config, architecture: Architecture) -> int | None:
    """The shared experts' width where the config derives it from the routed experts' (DeepSeek), else None."""
    if architecture.shared_count_key is None:
        return None
    return int(getattr(config, architecture.width_key)) * int(getattr(config, architecture.shared_count_key))


def width_fits(config, architecture: Architecture, width: int) -> bool:
    """Whether the config can say that the routed experts are `width` wide without changing the shared experts."""
    shared = shared_width(config, architecture)
    return architecture.width_key is not None and (shared is None or shared % width == 0)


def set_expert_width(config, architecture: Architecture, width: int) -> None:
    """Write the routed experts' new intermediate width into the config (--width), and where the shared experts'
    width is a multiple of it (DeepSeek), the multiple that keeps them as they are."""
    shared = shared_width(config, architecture)
    if shared is not None:
        setattr(config, architecture.shared_count_key, shared // int(width))
    setattr(config, architecture.width_key, int(width))


def set_width_attributes(experts: nn.Module, width: int) -> None:
    """Keep the experts module's cached width in step with its narrower tensors (as reloading would make it)."""
    for name in WIDTH_ATTRIBUTES:
        if isinstance(getattr(experts, name, None), int):
            setattr(experts, name, int(width))


def group_limits(config, architecture: Architecture) -> tuple[int, int] | None:
    """(expert groups, groups kept per token) when this config routes group-limited (DeepSeek), else None.

    DeepSeek-V3 always does; DeepSeek-V2 only with topk_method "group_limited_greedy" (its "greedy" ignores groups).
    """
    if architecture.group_keys is None:
        return None
    if architecture.group_method is not None and getattr(config, "topk_method", None) != architecture.group_method:
        return None
    groups, kept = (getattr(config, key, None) for key in architecture.group_keys)
    return (int(groups), int(kept)) if groups else None


def group_size_needed(config, architecture: Architecture, kept: int) -> int:
    """Fewest experts per group: the kept groups must hold top-k experts, and V3 scores a group by its best two."""
    return max(architecture.min_group_size, -(-top_k(config, architecture) // kept))


def valid_expert_counts(config, architecture: Architecture) -> list[int]:
    """Every K up to E that the family's routing can run with.

    Group-limited routing views the E scores as [n_group, E / n_group], keeps the best topk_group groups
    and takes the top-k inside them, so K must be a multiple of n_group with enough experts per group.
    """
    e, k_route = expert_count(config, architecture), top_k(config, architecture)
    limits = group_limits(config, architecture)
    if limits is None:
        return list(range(k_route, e + 1))
    groups, kept = limits
    need = group_size_needed(config, architecture, kept)
    return [k for k in range(groups, e + 1, groups) if k // groups >= need]


def check_k_for(config, architecture: Architecture, k: int) -> None:
    """Refuse, before any work, a K that the family's routing cannot run with, naming the nearest valid K.

    Only group-limited routing restricts K beyond check_k (1 <= top-k <= K <= E), which stays in charge of those bounds.
    """
    limits = group_limits(config, architecture)
    if limits is None or k > expert_count(config, architecture) or k < top_k(config, architecture):
        return
    valid = valid_expert_counts(config, architecture)
    if k in valid:
        return
    groups, kept = limits
    nearest = [n for n in valid if n < k][-1:] + [n for n in valid if n > k][:1]
    raise UserError(
        f"cannot keep {k} experts: {architecture.name} routes each token within {kept} of {groups} expert groups, "
        f"so K must be a multiple of {groups} with at least {group_size_needed(config, architecture, kept)} experts "
        f"per group; nearest valid K: {' or '.join(map(str, nearest)) or 'none'}"
    )


Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _route_softmax(moe: MoELayer, x: torch.Tensor) -> Routing:
    """Routers returning (logits, top-k weights, top-k indices), scored by a softmax over all experts.

    The router module itself makes the choice, so the statistics see exactly the model's routing: softmax
    then top-k (Qwen, Mixtral, OLMoE, DeepSeek-V2 with its group limit), top-k on the raw (biased) logits
    then softmax over the k (GPT-OSS, Granite), or sparsemixer (Phi-MoE).
    """
    logits, weights, indices = moe.router(x)
    return torch.softmax(logits.float(), dim=-1), weights, indices


def _route_sigmoid(moe: MoELayer, x: torch.Tensor) -> Routing:
    """DeepSeek-V3: the router returns (logits, weights, indices), choosing on sigmoid scores plus
    e_score_correction_bias within the kept groups; experts are scored by the sigmoid of their logits."""
    logits, weights, indices = moe.router(x)
    return torch.sigmoid(logits.float()), weights, indices


def _route_llama4(moe: MoELayer, x: torch.Tensor) -> Routing:
    """Llama 4: the router returns (scores [T, E], logits), scores being the sigmoid of the top-k logits and
    zero elsewhere; the top-k is re-taken on the same logits, exactly as the router does."""
    scores, logits = moe.router(x)
    indices = torch.topk(logits, moe.router.top_k, dim=1).indices
    return torch.sigmoid(logits.float()), scores.gather(1, indices), indices


ROUTINGS: dict[str, Callable[[MoELayer, torch.Tensor], Routing]] = {
    "softmax": _route_softmax,
    "sigmoid": _route_sigmoid,
    "llama4": _route_llama4,
}


def route(moe: MoELayer, architecture: Architecture, x: torch.Tensor) -> Routing:
    """The model's own routing of tokens x [T, H]: (scores [T, E] float32, weights [T, k], indices [T, k]).

    Scores are the family's per-expert scoring over all experts (softmax, or sigmoid for DeepSeek-V3 and
    Llama 4); weights and indices are the top-k choice and gate weights the MoE block really uses.
    """
    return ROUTINGS[architecture.routing](moe, x)


def expert_parameters(module: nn.Module, num_experts: int) -> dict[str, nn.Parameter]:
    """Parameters with one slice per expert (leading dimension E): weights, biases, score corrections."""
    return {
        name: param
        for name, param in module.named_parameters(recurse=False)
        if param.ndim >= 1 and param.shape[0] == num_experts
    } | {
        name: buffer
        for name, buffer in module.named_buffers(recurse=False)
        if buffer is not None and buffer.ndim >= 1 and buffer.shape[0] == num_experts
    }


def _glu(experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return experts.act_fn(gate) * up


def _clamped_swiglu(experts: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """GPT-OSS (GptOssExperts._apply_gate): gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha * gate)."""
    gate = gate.clamp(min=None, max=experts.limit)
    up = up.clamp(min=-experts.limit, max=experts.limit)
    return (up + 1) * (gate * torch.sigmoid(gate * experts.alpha))


ACTIVATIONS: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "glu": _glu,
    "clamped-swiglu": _clamped_swiglu,
}


def expert_intermediate(experts: nn.Module, architecture: Architecture, x: torch.Tensor) -> torch.Tensor:
    """The activation fed to down_proj, for every expert on every token, shape [E, T, I], in float32;
    x is [T, H] (the same tokens for every expert) or [E, T, H] (each expert its own tokens).

    Expert outputs are affine in this activation (down_proj is a matrix plus an optional bias, for every
    family, GPT-OSS's clamped SwiGLU included), so its mean over tokens gives every expert's mean output
    without a down projection per token.
    """
    weight = experts.gate_up_proj.float()
    if not architecture.transposed:
        weight = weight.transpose(1, 2)  # [E, H, 2I]
    h = torch.matmul(x.float() if x.dim() == 3 else x.float().unsqueeze(0), weight)  # [E, T, 2I]
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is not None:
        h = h + bias.float().unsqueeze(1)
    if architecture.gate_up_interleaved:
        gate, up = h[..., ::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    return ACTIVATIONS[architecture.activation](experts, gate, up)


def expert_output_from_intermediate(
    experts: nn.Module, architecture: Architecture, h: torch.Tensor, ids: list[int] | None = None
) -> torch.Tensor:
    """down_proj applied per expert: h [e, ..., I] -> [e, ..., H] in float32, for all experts or those in `ids`."""
    weight = experts.down_proj if ids is None else experts.down_proj[ids]
    if weight.shape[0] != h.shape[0]:
        raise ValueError(f"{h.shape[0]} activation slices for {weight.shape[0]} experts")
    equation = "e...i,eih->e...h" if architecture.transposed else "e...i,ehi->e...h"
    out = torch.einsum(equation, h, weight.float())
    bias = getattr(experts, "down_proj_bias", None)
    if bias is not None:
        bias = bias if ids is None else bias[ids]
        out = out + bias.float().view(bias.shape[0], *([1] * (out.ndim - 2)), -1)
    return out


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise ValueError("module not in model")
