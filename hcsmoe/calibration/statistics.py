"""Stage 1, calibrate: run calibration text through the original model and describe every expert.

For each MoE layer, with the input that layer receives in the original model, we accumulate in
float32: each expert's mean output over *all* calibration tokens (HC-SMoE's representation), each
expert's share of the real top-k routing decisions, its mean router probability, and a sample of
the layer's inputs for fitting the smaller router later.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hcsmoe.checkpoints.architectures import (
    Architecture,
    MoELayer,
    expert_intermediate,
    expert_output_from_intermediate,
    expert_parameters,
    route,
)
from hcsmoe.distributed import World
from hcsmoe.errors import UserError
from hcsmoe.workers import parallel_map

STATS_FORMAT = "hcsmoe-stats/1"


TENSOR_FIELDS = ("mean_output", "counts", "mean_router_prob", "router_inputs", "router_weight", "reap", "ean",
                 "weight_gram", "sample_outputs", "gated_mean_output")


@dataclass
class LayerStats:
    """What every planner may use about one MoE layer (all on the CPU)."""

    layer: int
    mean_output: torch.Tensor  # [E, H]: mean of E_j(x) over all calibration tokens (HC-SMoE)
    counts: torch.Tensor  # [E]: how often each expert was among the top-k
    mean_router_prob: torch.Tensor  # [E]: the family's score (softmax, or sigmoid) over all experts, token mean (S-prune)
    router_inputs: torch.Tensor  # [N, H]: a sample of the layer's inputs (router fit, router-logit features)
    router_weight: torch.Tensor | None = None  # [E, H]: the original router rows
    reap: torch.Tensor | None = None  # [E]: mean over routed tokens of gate weight x ||E_j(x)|| (REAP)
    ean: torch.Tensor | None = None  # [E]: mean over routed tokens of ||E_j(x)|| (EAN)
    weight_gram: torch.Tensor | None = None  # [E, E] float64: Gram matrix of flattened expert weights
    sample_outputs: torch.Tensor | None = None  # [E, n, H]: every expert's output on the first n sampled inputs
    gated_mean_output: torch.Tensor | None = None  # [E, H]: mean of p_j(x) E_j(x) over all tokens (REAM)
    tokens: int = 0

    @property
    def num_experts(self) -> int:
        return self.mean_output.shape[0]

    @property
    def frequency(self) -> torch.Tensor:
        """Share of top-k selections per expert (sums to one)."""
        total = self.counts.sum()
        return self.counts / total if total > 0 else torch.full_like(self.counts, 1.0 / len(self.counts))


@dataclass
class Statistics:
    layers: list[LayerStats]
    top_k: int
    info: dict = field(default_factory=dict)  # calibration source, token count, routing normalisation

    def layer(self, index: int) -> LayerStats:
        for stats in self.layers:
            if stats.layer == index:
                return stats
        raise KeyError(index)

    def save(self, path: str | Path) -> None:
        """Tensors as safetensors, metadata as JSON beside them (PATH and PATH.json)."""
        path = Path(path)
        tensors = {
            f"{s.layer}.{name}": getattr(s, name).contiguous()
            for s in self.layers
            for name in TENSOR_FIELDS
            if getattr(s, name) is not None
        }
        save_file(tensors, str(path))
        meta = {"format": STATS_FORMAT, "top_k": self.top_k, "info": self.info,
                "layers": [{"layer": s.layer, "tokens": s.tokens} for s in self.layers]}
        Path(f"{path}.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Statistics":
        path = Path(path)
        meta_path = Path(f"{path}.json")
        if not path.is_file() or not meta_path.is_file():
            raise UserError(f"statistics file {path} (and {meta_path.name} beside it) not found; write one with --save-stats")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format") != STATS_FORMAT:
            raise UserError(f"{meta_path} is not an hcsmoe statistics file")
        tensors = load_file(str(path))
        layers = [
            LayerStats(
                layer=entry["layer"],
                tokens=entry["tokens"],
                **{name: tensors.get(f"{entry['layer']}.{name}") for name in TENSOR_FIELDS},
            )
            for entry in meta["layers"]
        ]
        return cls(layers=layers, top_k=meta["top_k"], info=meta["info"])


@dataclass
class BlockTokens:
    """One MoE block on every calibration token, for the stages that fit the compressed block to the original."""

    inputs: torch.Tensor  # [T, H]: what the block receives
    routed: torch.Tensor  # [T, H] float32: the original routed experts' output (shared experts excluded)
    scores: torch.Tensor  # [T, E] float32: the original router's score of every expert (softmax or sigmoid)
    rest: torch.Tensor | None = None  # [T, H]: the decoder layer's output without the routed experts


ExpertChunk = tuple[int, nn.Module]  # (index of its first expert, a view of the experts module holding a few experts)


def expert_view(experts: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The experts module with its per-expert tensors replaced by `tensors` (a slice of the experts).

    Everything else (activation, GPT-OSS's alpha and limit, ...) is shared, so the adapters' expert
    arithmetic runs unchanged on a chunk of experts read from memory or from disk.
    """
    view = object.__new__(type(experts))
    view.__dict__.update(experts.__dict__)
    view.__dict__["_parameters"] = dict(tensors)
    view.__dict__["_buffers"] = {}
    return view


def experts_per_chunk(experts: nn.Module, num_experts: int, budget_bytes: int) -> int:
    """How many experts' float32 weights fit in `budget_bytes` (at least one)."""
    per_expert = sum(t[0].numel() * 4 for t in expert_parameters(experts, num_experts).values())
    return max(1, min(num_experts, budget_bytes // max(per_expert, 1)))


def weight_gram(chunks: Callable[[], Iterable[ExpertChunk]], num_experts: int) -> torch.Tensor:
    """Gram matrix of the experts' flattened weights, block by block: weight-space distances without
    holding a whole layer (only needed by the weight-feature planner)."""
    gram = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for first_a, view_a in chunks():
        flat_a = _flat_weights(view_a)
        for first_b, view_b in chunks():
            if first_b > first_a:
                break
            block = flat_a @ (flat_a if first_b == first_a else _flat_weights(view_b)).T
            n_a, n_b = block.shape
            gram[first_a : first_a + n_a, first_b : first_b + n_b] = block
            gram[first_b : first_b + n_b, first_a : first_a + n_a] = block.T
    return gram


def _flat_weights(view: nn.Module) -> torch.Tensor:
    tensors = list(view._parameters.values())
    return torch.cat([t.reshape(t.shape[0], -1).double() for t in tensors], dim=1)


class LayerAccumulator:
    """Running sums for one MoE layer: routing per token chunk, expert activations per expert chunk."""

    def __init__(self, moe: MoELayer, architecture: Architecture, tokens: int, max_router_inputs: int = 8192,
                 output_samples: int = 0, token_chunk: int = 2048):
        e = moe.num_experts
        self.moe = moe
        self.architecture = architecture
        self.tokens = tokens
        self.max_router_inputs = max_router_inputs
        self.output_samples = min(output_samples, tokens)
        self.token_chunk = token_chunk
        self.counts = torch.zeros(e, dtype=torch.float64)
        self.prob_sum = torch.zeros(e, dtype=torch.float64)
        self.reap_sum = torch.zeros(e, dtype=torch.float64)
        self.norm_sum = torch.zeros(e, dtype=torch.float64)
        self.intermediate_sum: dict[int, torch.Tensor] = {}  # first expert of a chunk -> [n, I]
        self.gated_sum: dict[int, torch.Tensor] = {}  # first expert of a chunk -> [n, I]: sum of p_j(x) h_j(x)
        self.mean_output: torch.Tensor | None = None
        self.gated_mean_output: torch.Tensor | None = None
        self.probs = torch.zeros(0)
        self.samples: torch.Tensor | None = None
        self.inputs = torch.zeros(0)

    def add_routing(self, probs: torch.Tensor, indices: torch.Tensor, x: torch.Tensor) -> None:
        """Top-k shares and scores from the family's own router, and a sample of inputs for router fits."""
        self.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=self.moe.num_experts).double()
        self.prob_sum += probs.double().sum(0).cpu()
        self.probs = probs
        self.inputs = x[: self.max_router_inputs].float().cpu().clone()

    def add_intermediate(self, first: int, view: nn.Module, h: torch.Tensor, first_token: int) -> None:
        """h [n, t, I]: the activations of experts first.. on tokens first_token.. (all of them, routed or not)."""
        sums = h.sum(1)
        self.intermediate_sum[first] = self.intermediate_sum[first] + sums if first in self.intermediate_sum else sums
        probs = self.probs[first_token : first_token + h.shape[1], first : first + h.shape[0]].float()
        gated = torch.einsum("nti,tn->ni", h, probs)
        self.gated_sum[first] = self.gated_sum[first] + gated if first in self.gated_sum else gated
        room = self.output_samples - first_token
        if room > 0:
            out = expert_output_from_intermediate(view, self.architecture, h[:, :room]).float().cpu()
            if self.samples is None:
                self.samples = torch.zeros(self.moe.num_experts, self.output_samples, out.shape[-1])
            self.samples[first : first + out.shape[0], first_token : first_token + out.shape[1]] = out

    def add_routed(self, expert: int, outputs: torch.Tensor, gates: torch.Tensor) -> None:
        """REAP/EAN sums: output norms on the tokens routed to `expert`, REAP weighted by the gate weight."""
        norms = outputs.norm(dim=-1).double().cpu()
        self.norm_sum[expert] += norms.sum()
        self.reap_sum[expert] += (norms * gates.double().cpu()).sum()

    def finish_chunk(self, first: int, view: nn.Module) -> None:
        """Mean outputs of a chunk's experts: outputs are affine in the activation, so down(mean h)."""
        mean_h = self.intermediate_sum.pop(first) / self.tokens
        out = expert_output_from_intermediate(view, self.architecture, mean_h.unsqueeze(1)).squeeze(1).float().cpu()
        if self.mean_output is None:
            self.mean_output = torch.zeros(self.moe.num_experts, out.shape[-1])
            self.gated_mean_output = torch.zeros(self.moe.num_experts, out.shape[-1])
        self.mean_output[first : first + out.shape[0]] = out
        gated_h = self.gated_sum.pop(first) / self.tokens
        gated = expert_output_from_intermediate(view, self.architecture, gated_h.unsqueeze(1)).squeeze(1).float().cpu()
        bias = getattr(view, "down_proj_bias", None)
        if bias is not None:  # p_j E_j = D (p_j h) + p_j b: the bias counts with the mean probability, not once
            share = (self.prob_sum[first : first + out.shape[0]] / self.tokens).float().unsqueeze(1)
            gated = gated - bias.float().cpu() * (1 - share)
        self.gated_mean_output[first : first + out.shape[0]] = gated

    def share(self, world: World) -> None:
        """Expert-parallel: give every rank the per-expert sums each rank computed for its own experts (routing
        sums are the same on every rank already)."""
        for tensor in (self.reap_sum, self.norm_sum, self.mean_output, self.gated_mean_output, self.samples):
            if tensor is not None:
                world.copy_rows(tensor)

    def result(self, gram: torch.Tensor | None = None) -> LayerStats:
        routed = self.counts.clamp(min=1)
        return LayerStats(
            layer=self.moe.index,
            mean_output=self.mean_output,
            counts=self.counts.float(),
            mean_router_prob=(self.prob_sum / self.tokens).float(),
            router_inputs=self.inputs,
            router_weight=self.moe.router.weight.detach().float().cpu().clone(),
            reap=(self.reap_sum / routed).float(),
            ean=(self.norm_sum / routed).float(),
            weight_gram=gram,
            sample_outputs=self.samples,
            gated_mean_output=self.gated_mean_output,
            tokens=self.tokens,
        )


@torch.no_grad()
def route_tokens(moe: MoELayer, architecture: Architecture, x: torch.Tensor, token_chunk: int = 2048):
    """The model's own routing of x [T, H], a chunk of tokens at a time: (scores [T, E], weights, indices)."""
    parts = [route(moe, architecture, chunk) for chunk in x.split(token_chunk)]
    return tuple(torch.cat([p[i] for p in parts]) for i in range(3))


@dataclass
class Routed:
    """A router's choice on every token of a block, and each expert's tokens (for the fitting stages)."""

    weights: torch.Tensor  # [T, k]
    indices: torch.Tensor  # [T, k]

    def tokens_of(self, expert: int, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(token positions relative to start, gate weights) of the tokens start:stop routed to `expert`."""
        token, slot = (self.indices[start:stop] == expert).nonzero(as_tuple=True)
        return token, self.weights[start:stop][token, slot]


def routed(moe: MoELayer, architecture: Architecture, x: torch.Tensor) -> Routed:
    """The layer's own (e.g. compressed) routing of x, float32 gate weights."""
    _, weights, indices = route_tokens(moe, architecture, x)
    return Routed(weights.float(), indices)


def token_spans(total: int, size: int):
    """(begin, stop) of consecutive spans of at most `size` tokens covering all `total`."""
    for begin in range(0, total, size):
        yield begin, min(total, begin + size)


def expert_slices(experts: nn.Module, expert: int) -> dict[str, torch.Tensor]:
    """Expert `expert`'s per-expert tensors as [1, ...] slices (views, no copy)."""
    return {name: tensor[expert : expert + 1] for name, tensor in experts._parameters.items()}


def one_expert_view(experts: nn.Module, expert: int) -> nn.Module:
    """The experts module reduced to expert `expert`, for the adapters' batched arithmetic on one expert."""
    return expert_view(experts, expert_slices(experts, expert))


def expert_features(experts: nn.Module, architecture: Architecture, expert: int, x: torch.Tensor,
                    gates: torch.Tensor) -> torch.Tensor:
    """What expert `expert`'s readout multiplies on tokens x routed to it with gate weights `gates`:
    gate * h(x) (gate-on-input families: h(gate * x)), plus the gate as the bias column when there is one."""
    one = one_expert_view(experts, expert)
    gates = gates.float().unsqueeze(-1)
    if architecture.gate_on_input:
        features = expert_intermediate(one, architecture, x * gates)[0]
    else:
        features = expert_intermediate(one, architecture, x)[0] * gates
    if getattr(experts, "down_proj_bias", None) is not None:
        features = torch.cat([features, gates], dim=-1)
    return features


@torch.no_grad()
def expert_pass(
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    chunks: Iterable[ExpertChunk],
    architecture: Architecture,
    accumulator: LayerAccumulator | None = None,
    token_chunk: int = 2048,
    gate_on_input: bool = False,
    out: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed-expert output of tokens x [T, H] (float32), a few experts at a time, with statistics.

    Every chunk of experts runs on every token in batched matrix products (HC-SMoE needs each expert's
    mean output over all tokens); the down projection runs only on the tokens routed to each expert,
    which gives the layer's real output and the REAP/EAN norms. Nothing per token is kept.
    `gate_on_input`: the family scales an expert's input by its gate instead of its output (Llama 4).
    `out`: a zeroed float32 [T, H] buffer to accumulate into (e.g. memory-mapped); allocated if None.
    Without an accumulator (replaying a compressed layer) each expert runs only on the tokens routed to it.
    `slots`: a zeroed float32 [T, k, H] buffer that receives each token's contributions per top-k slot instead of
    their sum (an expert-parallel rank runs only some experts; `add_slots` sums them in the one-process order).
    """
    if out is None:
        out = torch.zeros(x.shape[0], x.shape[-1], dtype=torch.float32, device=x.device)
    for first, view in chunks:
        count = view.down_proj.shape[0]
        for first_token in range(0, x.shape[0], token_chunk):
            xt = x[first_token : first_token + token_chunk]
            h = None
            if accumulator is not None:  # statistics need every expert on every token: one expert per worker
                h = torch.cat(parallel_map(partial(local_intermediate, view, architecture, xt), range(count)))  # [n, t, I]
                accumulator.add_intermediate(first, view, h, first_token)
            chosen = indices[first_token : first_token + token_chunk]
            gates_of = weights[first_token : first_token + token_chunk]
            parts = parallel_map(partial(routed_part, view, architecture, first, xt, chosen, gates_of, h, gate_on_input),
                                 range(count))
            for local, part in enumerate(parts):  # added in ascending expert order, whatever the workers
                if part is None:
                    continue
                token, slot, y, gates, contribution = part
                if slots is not None:
                    slots[token + first_token, slot] = contribution
                else:
                    out.index_add_(0, token + first_token, contribution)
                if accumulator is not None:
                    accumulator.add_routed(first + local, y, gates)
        if accumulator is not None:
            accumulator.finish_chunk(first, view)
        view = h = None  # let the chunk go before the next one is read
    return out


def local_intermediate(view: nn.Module, architecture: Architecture, xt: torch.Tensor, local: int) -> torch.Tensor:
    """Expert `local` of a chunk of experts on every token xt: its activations [1, t, I]."""
    return expert_intermediate(one_expert_view(view, local), architecture, xt)


def routed_part(view: nn.Module, architecture: Architecture, first: int, xt: torch.Tensor, chosen: torch.Tensor,
                gates_of: torch.Tensor, h: torch.Tensor | None, gate_on_input: bool, local: int):
    """Expert `local` of a chunk of experts (first..)'s part of the routed output on a token chunk: (tokens,
    their top-k slots, its output y before the gates, the gates, its contribution), or None when no token chose
    it. `h`: every expert's activations on the chunk's tokens, when the statistics computed them already."""
    token, slot = (chosen == first + local).nonzero(as_tuple=True)
    if token.numel() == 0:
        return None
    routed_h = h[local : local + 1, token] if h is not None else local_intermediate(view, architecture, xt[token], local)
    y = expert_output_from_intermediate(view, architecture, routed_h, [local])[0]
    gates = gates_of[token, slot].float()
    if gate_on_input:
        one = one_expert_view(view, local)
        scaled = expert_intermediate(one, architecture, xt[token] * gates.unsqueeze(-1))
        return token, slot, y, gates, expert_output_from_intermediate(one, architecture, scaled)[0]
    return token, slot, y, gates, y * gates.unsqueeze(-1)


def add_slots(slots: torch.Tensor, indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Add each token's per-slot contributions [T, k, H] into out [T, H] in ascending expert order: the order
    in which one process's expert pass adds them, so the sum is the same bit for bit."""
    order = indices.argsort(dim=1)
    tokens = torch.arange(slots.shape[0], device=slots.device)
    for position in range(order.shape[1]):
        out += slots[tokens, order[:, position]]
    return out
