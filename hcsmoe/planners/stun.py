"""STUN's expert stage (Lee et al., ACL 2025, "Structured-Then-Unstructured Pruning"): experts that behave
alike are clustered by their routing alone (no calibration pass over the experts is needed for the
distances), and each cluster keeps one of its experts, with its own router row.

As the authors' code does it: the distance between two experts is the L2 distance between their router rows
(`similarity="router"`), or, as their README does for Snowflake Arctic, how often two experts are both in a
token's top-k (`"co-selection"`, on the calibration inputs, negated and scaled by its mean); experts are
merged into clusters while every cross-cluster distance stays small, i.e. complete-linkage agglomerative
clustering, cut here at exactly K clusters (a config holds one expert count per model, where STUN searches a
threshold that gives layers different counts); in each cluster the survivor is the expert whose flattened
weights lie nearest (L2) the cluster's mean weights, computed from the weights' Gram matrix. Layers with at
most two clusters average their members instead, as the authors' code does (here with the recipe's router
rows). STUN's second, unstructured stage (OWL-weighted Wanda) writes zeros that no engine stores sparsely.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform

from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.errors import UserError
from hcsmoe.planners.clustering import groups_from_linkage
from hcsmoe.planners.plan import LayerPlan, make_group

SIMILARITIES = ("router", "co-selection")


class STUN:
    """STUN's expert pruning: complete-linkage clusters of router rows (or co-selection), one survivor each."""

    name = "stun"
    needs_weight_gram = True

    def __init__(self, similarity: str = "router", top_k: int = 2):
        if similarity not in SIMILARITIES:
            raise UserError(f"unknown similarity {similarity!r}; choose one of: {', '.join(SIMILARITIES)}")
        self.similarity, self.top_k = similarity, top_k

    def options(self) -> dict:
        return {"similarity": self.similarity}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        if stats.router_weight is None or stats.weight_gram is None:
            raise UserError("stun needs the router rows and the experts' weight Gram matrix; recompute the statistics")
        distances = expert_distances(stats, self.similarity, self.top_k)
        tree = scipy_linkage(squareform(distances, checks=False), method="complete")
        clusters = groups_from_linkage(tree, stats.num_experts, k)
        if k <= 2:
            groups = [make_group(cluster, stats, "average") for cluster in clusters]
        else:
            survivors = [nearest_to_mean(cluster, stats.weight_gram) for cluster in clusters]
            groups = [make_group([survivor], stats, "frequency") for survivor in sorted(survivors)]
        return LayerPlan(stats.layer, stats.num_experts, groups,
                         details={"clusters": clusters, "distances": np.round(distances, 6).tolist()})


def expert_distances(stats: LayerStats, similarity: str, top_k: int) -> np.ndarray:
    """[E, E] distances: between router rows, or from co-selection counts (a monotone map: the complete-linkage
    tree depends only on their order)."""
    if similarity == "router":
        rows = stats.router_weight.double()
        return torch.cdist(rows, rows).numpy()
    chosen = (stats.router_inputs.double() @ stats.router_weight.double().T).topk(top_k, dim=-1).indices
    hits = torch.zeros(chosen.shape[0], stats.num_experts, dtype=torch.float64).scatter_(1, chosen, 1.0)
    together = hits.T @ hits
    together.fill_diagonal_(0)
    scaled = together / max(float(together.mean()), 1e-12)
    distances = (float(scaled.max()) - scaled).numpy()
    np.fill_diagonal(distances, 0.0)
    return distances


def nearest_to_mean(cluster: list[int], gram: torch.Tensor) -> int:
    """The member whose weights are nearest the cluster's mean: ||w_i - mean||^2 = G_ii - 2 mean_j G_ij + const."""
    index = torch.tensor(cluster)
    block = gram.double()[index][:, index]
    distance = block.diagonal() - 2 * block.mean(1)
    return cluster[int(torch.argmin(distance))]
