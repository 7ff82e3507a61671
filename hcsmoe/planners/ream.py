"""REAM's planner: the most salient experts are centres, the others join the centre they resemble most."""

from __future__ import annotations

import torch

from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.errors import UserError
from hcsmoe.planners.clustering import expert_features
from hcsmoe.planners.plan import ASSIGNMENTS, MERGES, Group, LayerPlan
from hcsmoe.planners.pruning import top_experts


class REAM:
    """REAM (Jha et al., 2026): the K experts with the highest REAP saliency are group centres, the others
    join a centre by similarity, and each group is merged onto its centre with saliency weights (by
    default after aligning every member's neurons to the centre's, Hungarian matching).

    Similarity between experts is 1/2 [(1 + cos)/2 of their gated mean outputs (mean over tokens of
    p_j(x) E_j(x)) + 1 - d/d_max, d the distance between their unit-normalised router-logit columns].
    `assignment="greedy"` is REAM as published: centres in descending saliency each take their most similar
    unassigned experts until their group holds `group_size` (16 in the paper; some experts can stay
    unassigned, i.e. pruned). `assignment="nearest"`: every expert joins its most similar centre that still
    has room, most similar pairs first, so nothing is pruned and no group chains (`group_size=0`: the
    smallest cap that holds every expert, at least 2: max(2, ceil(E / K))).
    """

    name = "ream"

    def __init__(self, group_size: int = 16, assignment: str = "greedy", merge: str = "aligned"):
        if assignment not in ASSIGNMENTS:
            raise UserError(f"unknown assignment {assignment!r}; choose one of: {', '.join(ASSIGNMENTS)}")
        if merge not in MERGES:
            raise UserError(f"unknown merge {merge!r}; choose one of: {', '.join(MERGES)}")
        if group_size < 0:
            raise UserError(f"--group-size must be at least 1 (or 0: as small as holds every expert), got {group_size}")
        self.group_size, self.assignment, self.merge = group_size, assignment, merge

    def options(self) -> dict:
        return {"group_size": self.group_size, "assignment": self.assignment, "merge": self.merge}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        if stats.reap is None or stats.gated_mean_output is None:
            raise UserError("these statistics have no REAP scores or gated mean outputs; recompute them")
        n = stats.num_experts
        centres = top_experts(stats.reap, k)  # descending saliency
        similarity = ream_similarity(stats)
        cap = self.group_size or max(2, -(-n // k))
        if self.assignment == "greedy":
            members = greedy_groups(similarity, centres, cap)
        else:
            if cap * k < n:
                raise UserError(f"{k} groups of at most {cap} experts cannot hold {n} experts; raise --group-size")
            members = nearest_groups(similarity, centres, cap)
        saliency = stats.reap.double().clamp(min=1e-12)
        groups = []
        for centre in centres:
            group = sorted(members[centre])
            weights = saliency[group] / saliency[group].sum()
            groups.append(Group(group, weights.tolist(), [float(stats.frequency[m]) for m in group]))
        groups.sort(key=lambda g: g.members[0])
        return LayerPlan(stats.layer, n, groups, details={"centres": sorted(centres),
                                                           "similarity": similarity.numpy().round(4).tolist()})


def ream_similarity(stats: LayerStats) -> torch.Tensor:
    """[E, E] similarity in [0, 1]: gated mean outputs (cosine) and router-logit columns (distance), averaged."""
    outputs = torch.nn.functional.normalize(stats.gated_mean_output.double(), dim=1)
    s_out = (1 + outputs @ outputs.T) / 2
    columns = torch.nn.functional.normalize(expert_features(stats, "router-logits"), dim=1)
    distance = torch.cdist(columns, columns)
    s_gate = 1 - distance / distance.max().clamp(min=1e-12)
    return (s_out + s_gate) / 2


def greedy_groups(similarity: torch.Tensor, centres: list[int], cap: int) -> dict[int, list[int]]:
    """REAM's pseudo-pruning: each centre, most salient first, takes its most similar free experts up to `cap`."""
    free = [e for e in range(similarity.shape[0]) if e not in set(centres)]
    groups = {}
    for centre in centres:
        ranked = sorted(free, key=lambda e: (-float(similarity[centre, e]), e))
        taken = ranked[: cap - 1]
        groups[centre] = [centre] + taken
        free = [e for e in free if e not in set(taken)]
    return groups


def nearest_groups(similarity: torch.Tensor, centres: list[int], cap: int) -> dict[int, list[int]]:
    """Every non-centre expert joins a centre with room, the most similar (expert, centre) pairs first."""
    groups = {c: [c] for c in centres}
    others = [e for e in range(similarity.shape[0]) if e not in groups]
    pairs = sorted(((float(similarity[e, c]), e, c) for e in others for c in centres), key=lambda p: (-p[0], p[1], p[2]))
    placed = set()
    for _, expert, centre in pairs:
        if expert not in placed and len(groups[centre]) < cap:
            groups[centre].append(expert)
            placed.add(expert)
    return groups
