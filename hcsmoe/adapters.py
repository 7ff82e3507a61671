"""Architectures as data: where each family keeps its MoE blocks, routers, experts and expert counts.

Every supported family in transformers 5 stores the routed experts of a layer as fused 3-D
parameters on an `experts` module and the router as a module whose parameters have one row per
expert. An adapter only names those places; all the work is generic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hcsmoe.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """Where one model family keeps its MoE parts (dotted attribute paths from the model)."""

    name: str
    model_types: tuple[str, ...]
    count_keys: tuple[str, ...]  # config.json keys that hold the routed-expert count (new and legacy names)
    layers: str = "model.layers"
    moe_block: str = "mlp"
    router: str = "gate"
    experts: str = "experts"
    shared: tuple[str, ...] = ()  # modules inside the block that are left untouched
    top_k_key: str = "num_experts_per_tok"
    gate_up_interleaved: bool = False  # [g0, u0, g1, u1, ...] instead of [gate; up]
    transposed: bool = False  # gate_up_proj stored [E, H, 2I] instead of [E, 2I, H]


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("Qwen3-MoE", ("qwen3_moe",), count_keys=("num_experts", "num_local_experts")),
    Architecture(
        "Qwen2-MoE",
        ("qwen2_moe",),
        count_keys=("num_experts",),
        shared=("shared_expert", "shared_expert_gate"),
    ),
    Architecture("Mixtral", ("mixtral",), count_keys=("num_local_experts",)),
    Architecture("OLMoE", ("olmoe",), count_keys=("num_experts",)),
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


def moe_layers(model: nn.Module, architecture: Architecture) -> list[MoELayer]:
    """The decoder layers whose MLP is a routed MoE block (dense layers are skipped)."""
    layers = get_path(model, architecture.layers)
    if layers is None:
        raise UserError(f"cannot find {architecture.layers} in this {architecture.name} model")
    found = []
    for index, layer in enumerate(layers):
        block = get_path(layer, architecture.moe_block)
        router = get_path(block, architecture.router) if block is not None else None
        experts = get_path(block, architecture.experts) if block is not None else None
        if router is not None and experts is not None and hasattr(experts, "gate_up_proj"):
            found.append(MoELayer(index, block, router, experts))
    if not found:
        raise UserError(f"this {architecture.name} model has no MoE layers to compress")
    return found


def top_k(config, architecture: Architecture) -> int:
    return int(getattr(config, architecture.top_k_key))


def expert_count(config, architecture: Architecture) -> int:
    return int(getattr(config, architecture.count_keys[0]))


def set_expert_count(config, architecture: Architecture, count: int) -> None:
    """Write the new routed-expert count under every key the family's config classes read."""
    for key in architecture.count_keys:
        setattr(config, key, count)


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


def expert_intermediate(experts: nn.Module, architecture: Architecture, x: torch.Tensor) -> torch.Tensor:
    """act(gate) * up for every expert on every token, shape [E, T, I], computed in float32.

    Expert outputs are linear in this activation (down_proj is a plain matrix), so its mean over
    tokens gives every expert's mean output without a down projection per token.
    """
    weight = experts.gate_up_proj.float()
    if not architecture.transposed:
        weight = weight.transpose(1, 2)  # [E, H, 2I]
    h = torch.matmul(x.float().unsqueeze(0), weight)  # [E, T, 2I]
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is not None:
        h = h + bias.float().unsqueeze(1)
    if architecture.gate_up_interleaved:
        gate, up = h[..., ::2], h[..., 1::2]
    else:
        gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


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
