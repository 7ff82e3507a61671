"""Pruning planners: keep K experts by a score (frequency, router probability, REAP, EAN), by searching
subsets (O-prune), or at random; the dropped experts belong to no group.
"""

from __future__ import annotations

import itertools
import math

import torch

from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import LayerPlan, make_group


def top_experts(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores; ties go to the lower index, so the choice is deterministic."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return order[:k]


class ScorePrune:
    """Keep the k experts with the highest score; the others are dropped (groups of one)."""

    score_field = ""
    name = ""

    def options(self) -> dict:
        return {"score": self.score_field}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        scores = getattr(stats, self.score_field)
        if scores is None:
            raise UserError(f"these statistics have no {self.score_field} scores; recompute them")
        kept = sorted(top_experts(scores, k))
        return LayerPlan(stats.layer, stats.num_experts, [make_group([e], stats, "frequency") for e in kept],
                         details={"scores": [round(float(v), 6) for v in scores]})


class FrequencyPrune(ScorePrune):
    """F-prune: keep the experts chosen most often by the top-k router."""

    name, score_field = "f-prune", "counts"


class SoftPrune(ScorePrune):
    """S-prune: keep the experts with the highest mean router probability (softmax over all experts)."""

    name, score_field = "s-prune", "mean_router_prob"


class REAP(ScorePrune):
    """REAP (Cerebras, 2025): keep the experts with the highest mean, over the tokens routed to them,
    of router weight x L2 norm of the expert's output."""

    name, score_field = "reap", "reap"


class EAN(ScorePrune):
    """EAN: REAP without the router weight (mean output norm over routed tokens)."""

    name, score_field = "ean", "ean"


class OPrune:
    """O-prune (Lu et al., ACL 2024): keep the k-subset whose layer output on calibration inputs is closest
    (Frobenius norm) to the original layer's; exhaustive up to `max_subsets` subsets, else that many at random."""

    name = "o-prune"
    needs_output_samples = True

    def __init__(self, max_subsets: int = 10000, seed: int = 0, norm_topk_prob: bool = True, top_k: int = 2):
        self.max_subsets, self.seed = max_subsets, seed
        self.norm_topk_prob, self.top_k = norm_topk_prob, top_k

    def options(self) -> dict:
        return {"max_subsets": self.max_subsets, "seed": self.seed}

    def candidate_subsets(self, e: int, k: int, layer: int) -> torch.Tensor:
        if math.comb(e, k) <= self.max_subsets:
            return torch.tensor(list(itertools.combinations(range(e), k)))
        generator = torch.Generator().manual_seed(self.seed * 100003 + layer)
        return torch.stack([torch.randperm(e, generator=generator)[:k].sort().values for _ in range(self.max_subsets)])

    def layer_outputs(self, logits: torch.Tensor, outputs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """MoE output [B, n, H] on the sampled tokens when only the experts in `keep` [B, E] remain."""
        masked = logits.unsqueeze(0).masked_fill(~keep.unsqueeze(1), float("-inf"))
        weights, index = torch.softmax(masked, dim=-1).topk(self.top_k, dim=-1)  # [B, n, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        tokens = torch.arange(outputs.shape[0]).view(1, -1, 1)
        return (weights.unsqueeze(-1) * outputs[tokens, index]).sum(2)

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        if stats.sample_outputs is None or stats.router_weight is None:
            raise UserError("o-prune needs expert outputs on sampled tokens; calibrate with output samples")
        outputs = stats.sample_outputs.double().transpose(0, 1)  # [n, E, H]
        logits = stats.router_inputs[: outputs.shape[0]].double() @ stats.router_weight.double().T  # [n, E]
        e = stats.num_experts
        target = self.layer_outputs(logits, outputs, torch.ones(1, e, dtype=torch.bool))[0]
        subsets = self.candidate_subsets(e, k, stats.layer)
        errors = []
        for batch in subsets.split(64):
            keep = torch.zeros(len(batch), e, dtype=torch.bool).scatter_(1, batch, True)
            errors.append((self.layer_outputs(logits, outputs, keep) - target).pow(2).sum((1, 2)).sqrt())
        errors = torch.cat(errors)
        best = int(errors.argmin())
        kept = subsets[best].tolist()
        return LayerPlan(stats.layer, stats.num_experts, [make_group([x], stats, "frequency") for x in kept],
                         details={"subsets_tried": len(subsets), "exhaustive": math.comb(e, k) <= self.max_subsets,
                                  "error": float(errors[best])})


class RandomPrune:
    """Keep k experts chosen at random: the floor every method has to clear."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def options(self) -> dict:
        return {"seed": self.seed}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        generator = torch.Generator().manual_seed(self.seed * 100003 + stats.layer)
        kept = torch.randperm(stats.num_experts, generator=generator)[:k].sort().values.tolist()
        return LayerPlan(stats.layer, stats.num_experts, [make_group([e], stats, "frequency") for e in kept])
