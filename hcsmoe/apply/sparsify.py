"""STUN's unstructured stage (opt-in, --sparsity S): after the fits, zero a fraction S of the routed experts'
weights, OWL-weighted Wanda as the STUN authors' code does it (OWL/lib/prune_all.py, prune_wanda_outlier).

Wanda scores a weight by |W_ij| x ||x_j||, x_j its input feature over the calibration tokens the expert is
routed (for gate/up: the layer's hidden states; for down: the expert's intermediate activations), and zeroes the
lowest-scoring share of every output row. OWL gives layers with more outliers (scores above M = 5 times the
layer's mean) a lower share: the layers' outlier ratios are spread over [0, 2 lambda] (lambda = 0.08), centred,
and taken from the target density 1 - S. No engine stores MoE sparsity today (compressed-tensors dropped its
sparse formats, vLLM and transformers v5 no longer load them): the zeros are written into a dense checkpoint and
save nothing on disk or in memory. This stage exists to measure STUN's claim, not to make models smaller.
"""

from __future__ import annotations

import torch

from hcsmoe.calibration.statistics import BlockTokens, expert_features, routed
from hcsmoe.checkpoints.architectures import Architecture, MoELayer
from hcsmoe.errors import UserError

OUTLIER_FACTOR = 5.0  # OWL's M ("Hyper_m")
OUTLIER_SPREAD = 0.08  # OWL's lambda ("Lamda")
PRUNED = ("gate_up_proj", "down_proj")


@torch.no_grad()
def input_norms(moe: MoELayer, architecture: Architecture, tokens: BlockTokens) -> list[dict[str, torch.Tensor]]:
    """Per expert of the (compressed) layer, the L2 norm of every input feature of gate/up ([H]) and of down
    ([I]) over the calibration tokens its router sends it: Wanda's activation term."""
    routing = routed(moe, architecture, tokens.inputs)
    norms = []
    for expert in range(moe.experts.down_proj.shape[0]):
        token, _ = routing.tokens_of(expert)
        x = tokens.inputs[token].float()
        width = moe.experts.down_proj.shape[1 if architecture.transposed else 2]
        h = expert_features(moe.experts, architecture, expert, x, torch.ones(len(token)))[:, :width]
        norms.append({"gate_up_proj": x.norm(dim=0), "down_proj": h.norm(dim=0)})
    return norms


def scores(moe: MoELayer, architecture: Architecture, norms: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Wanda's score of every routed-expert weight, shaped [out, in] per expert: |W| x the norm of its input."""
    found = {}
    for name in PRUNED:
        weight = getattr(moe.experts, name).detach().float()
        if architecture.transposed:  # stored [E, in, out]
            weight = weight.transpose(1, 2)
        found[name] = weight.abs() * torch.stack([n[name] for n in norms]).unsqueeze(1)
    return found


def outlier_ratio(layer_scores: dict[str, torch.Tensor]) -> float:
    """OWL's layer outlier ratio: the percentage of scores above OUTLIER_FACTOR times their mean."""
    flat = torch.cat([s.flatten() for s in layer_scores.values()])
    return float((flat > OUTLIER_FACTOR * flat.mean()).double().mean()) * 100


def layer_sparsities(ratios: list[float], sparsity: float) -> list[float]:
    """OWL's per-layer sparsities: the outlier ratios spread over [0, 2 lambda], centred, taken from the density."""
    ratios_t = torch.tensor(ratios, dtype=torch.float64)
    spread = ratios_t.max() - ratios_t.min()
    scaled = (ratios_t - ratios_t.min()) / spread * 2 * OUTLIER_SPREAD if spread > 0 else torch.zeros_like(ratios_t)
    density = scaled - scaled.mean() + (1 - sparsity)
    return [max(0.01, float(1 - d)) for d in density]


@torch.no_grad()
def zero_lowest(moe: MoELayer, architecture: Architecture, layer_scores: dict[str, torch.Tensor], share: float) -> int:
    """Zero the lowest-scoring `share` of every output row of every routed-expert weight; returns how many."""
    zeroed = 0
    for name, score in layer_scores.items():
        count = int(score.shape[-1] * share)
        if count == 0:
            continue
        lowest = score.argsort(dim=-1, stable=True)[..., :count]  # [E, out, count]
        mask = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, lowest, True)
        weight = getattr(moe.experts, name)
        weight.data.masked_fill_(mask.transpose(1, 2) if architecture.transposed else mask, 0)
        zeroed += int(mask.sum())
    return zeroed


def sparsify_layers(layers: list[MoELayer], architecture: Architecture, norms: dict[int, list], sparsity: float) -> dict:
    """OWL-Wanda over every MoE layer (their input norms recorded as they were fitted); returns what it did."""
    if not 0 < sparsity < 1:
        raise UserError(f"--sparsity is the share of the routed experts' weights to zero, in (0, 1); got {sparsity}")
    layer_scores = {moe.index: scores(moe, architecture, norms[moe.index]) for moe in layers}
    ratios = [outlier_ratio(layer_scores[moe.index]) for moe in layers]
    shares = layer_sparsities(ratios, sparsity)
    zeroed = [zero_lowest(moe, architecture, layer_scores[moe.index], share) for moe, share in zip(layers, shares)]
    total = sum(getattr(moe.experts, name).numel() for moe in layers for name in PRUNED)
    return {"sparsity": sparsity, "outlier_ratios": [round(r, 4) for r in ratios],
            "layer_sparsities": [round(s, 4) for s in shares], "zeroed": round(sum(zeroed) / total, 4)}
