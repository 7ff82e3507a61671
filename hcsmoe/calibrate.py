"""Step 1: run calibration text through the original model and describe every expert.

For each MoE layer, with the input that layer receives in the original model, we accumulate in
float32: each expert's mean output over *all* calibration tokens (HC-SMoE's representation), each
expert's share of the real top-k routing decisions, its mean router probability, and a sample of
the layer's inputs for fitting the smaller router later.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hcsmoe.adapters import (
    Architecture,
    MoELayer,
    expert_intermediate,
    expert_output_from_intermediate,
    expert_parameters,
)
from hcsmoe.errors import UserError

STATS_FORMAT = "hcsmoe-stats/1"


TENSOR_FIELDS = ("mean_output", "counts", "mean_router_prob", "router_inputs", "router_weight", "reap", "ean",
                 "weight_gram", "sample_outputs")


@dataclass
class LayerStats:
    """What every planner may use about one MoE layer (all on the CPU)."""

    layer: int
    mean_output: torch.Tensor  # [E, H]: mean of E_j(x) over all calibration tokens (HC-SMoE)
    counts: torch.Tensor  # [E]: how often each expert was among the top-k
    mean_router_prob: torch.Tensor  # [E]: softmax over all experts, averaged over tokens (S-prune)
    router_inputs: torch.Tensor  # [N, H]: a sample of the layer's inputs (router fit, router-logit features)
    router_weight: torch.Tensor | None = None  # [E, H]: the original router rows
    reap: torch.Tensor | None = None  # [E]: mean over routed tokens of gate weight x ||E_j(x)|| (REAP)
    ean: torch.Tensor | None = None  # [E]: mean over routed tokens of ||E_j(x)|| (EAN)
    weight_gram: torch.Tensor | None = None  # [E, E] float64: Gram matrix of flattened expert weights
    sample_outputs: torch.Tensor | None = None  # [E, n, H]: every expert's output on the first n sampled inputs
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


def weight_gram(experts: nn.Module, num_experts: int) -> torch.Tensor:
    """Gram matrix of the experts' flattened weights: distances in weight space without storing them twice."""
    gram = torch.zeros(num_experts, num_experts, dtype=torch.float64)
    for tensor in expert_parameters(experts, num_experts).values():
        flat = tensor.detach().reshape(num_experts, -1).double().cpu()
        gram += flat @ flat.T
    return gram


class _LayerAccumulator:
    """Running sums for one MoE layer, fed by a forward pre-hook on its block."""

    def __init__(self, moe: MoELayer, architecture: Architecture, max_router_inputs: int, token_chunk: int,
                 output_samples: int):
        self.moe = moe
        self.architecture = architecture
        self.max_router_inputs = max_router_inputs
        self.token_chunk = token_chunk
        self.output_samples = output_samples
        self.tokens = 0
        e = moe.num_experts
        self.intermediate_sum: torch.Tensor | None = None
        self.counts = torch.zeros(e, dtype=torch.float64)
        self.prob_sum = torch.zeros(e, dtype=torch.float64)
        self.reap_sum = torch.zeros(e, dtype=torch.float64)
        self.norm_sum = torch.zeros(e, dtype=torch.float64)
        self.inputs: list[torch.Tensor] = []
        self.samples: list[torch.Tensor] = []
        self.kept_inputs = 0
        self.kept_samples = 0

    @torch.no_grad()
    def add(self, hidden: torch.Tensor) -> None:
        for x in hidden.reshape(-1, hidden.shape[-1]).split(self.token_chunk):
            self._add_chunk(x)

    def _add_chunk(self, x: torch.Tensor) -> None:
        e = self.moe.num_experts
        logits, scores, indices = self.moe.router(x)
        self.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=e).double()
        self.prob_sum += torch.softmax(logits.float(), dim=-1).sum(0).double().cpu()
        h = expert_intermediate(self.moe.experts, self.architecture, x)  # [E, t, I]
        self.intermediate_sum = h.sum(1) if self.intermediate_sum is None else self.intermediate_sum + h.sum(1)
        self._add_routed_norms(h, scores, indices)
        self._keep_samples(x, h)
        self.tokens += x.shape[0]

    def _add_routed_norms(self, h: torch.Tensor, scores: torch.Tensor, indices: torch.Tensor) -> None:
        """REAP/EAN sums: output norms only on the tokens each expert was routed to."""
        for expert in indices.unique().tolist():
            token, slot = (indices == expert).nonzero(as_tuple=True)
            out = expert_output_from_intermediate(self.moe.experts, self.architecture, h[expert : expert + 1, token], [expert])
            norms = out[0].norm(dim=-1).double().cpu()
            self.norm_sum[expert] += norms.sum()
            self.reap_sum[expert] += (norms * scores[token, slot].double().cpu()).sum()

    def _keep_samples(self, x: torch.Tensor, h: torch.Tensor) -> None:
        room = self.max_router_inputs - self.kept_inputs
        if room > 0:
            self.inputs.append(x[:room].float().cpu())
            self.kept_inputs += self.inputs[-1].shape[0]
        room = self.output_samples - self.kept_samples
        if room > 0:
            out = expert_output_from_intermediate(self.moe.experts, self.architecture, h[:, :room])
            self.samples.append(out.float().cpu())
            self.kept_samples += out.shape[1]

    @torch.no_grad()
    def result(self) -> LayerStats:
        e = self.moe.num_experts
        mean_h = self.intermediate_sum / self.tokens  # [E, I]: outputs are linear in h
        mean_output = expert_output_from_intermediate(self.moe.experts, self.architecture, mean_h.unsqueeze(1))
        routed = self.counts.clamp(min=1)
        return LayerStats(
            layer=self.moe.index,
            mean_output=mean_output.squeeze(1).float().cpu(),
            counts=self.counts.float(),
            mean_router_prob=(self.prob_sum / self.tokens).float(),
            router_inputs=torch.cat(self.inputs) if self.inputs else torch.zeros(0),
            router_weight=self.moe.router.weight.detach().float().cpu().clone(),
            reap=(self.reap_sum / routed).float(),
            ean=(self.norm_sum / routed).float(),
            weight_gram=weight_gram(self.moe.experts, e),
            sample_outputs=torch.cat(self.samples, dim=1) if self.samples else None,
            tokens=self.tokens,
        )


@torch.no_grad()
def calibrate(
    model: nn.Module,
    architecture: Architecture,
    layers: list[MoELayer],
    blocks: torch.Tensor,
    *,
    batch_size: int = 4,
    max_router_inputs: int = 8192,
    output_samples: int = 0,
    token_chunk: int = 2048,
    progress: bool = True,
) -> list[LayerStats]:
    """Statistics of every MoE layer, from the original model run on `blocks` [N, L] of token ids.

    `output_samples` > 0 also keeps every expert's output on that many tokens (O-prune needs them).
    """
    accumulators = [_LayerAccumulator(m, architecture, max_router_inputs, token_chunk, output_samples)
                    for m in layers]
    hooks = [
        acc.moe.block.register_forward_pre_hook(lambda module, args, acc=acc: acc.add(args[0]))
        for acc in accumulators
    ]
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)  # the decoder without the LM head
    try:
        for batch in tqdm(blocks.split(batch_size), desc="calibrating", unit="batch", disable=not progress):
            body(input_ids=batch.to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return [acc.result() for acc in accumulators]
