"""Merging planners that cluster experts: HC-SMoE (hierarchical clustering, optionally with a group-size
cap), k-means, and M-SMoE (dominant experts and router-logit similarity).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.cluster.vq import kmeans2
from scipy.spatial.distance import pdist, squareform

from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import LINKAGES, MERGES, METRICS, REPRESENTATIONS, LayerPlan, make_group
from hcsmoe.planners.pruning import top_experts


def groups_from_linkage(linkage_matrix: np.ndarray, n: int, k: int) -> list[list[int]]:
    """Exactly k clusters: replay the first n - k merges of the tree (no criterion that can return fewer)."""
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    for step in range(n - k):
        a, b = int(linkage_matrix[step, 0]), int(linkage_matrix[step, 1])
        clusters[n + step] = clusters.pop(a) + clusters.pop(b)
    return sorted((sorted(c) for c in clusters.values()), key=lambda c: c[0])


def expert_distances(stats: LayerStats, representation: str, metric: str) -> np.ndarray:
    """Condensed pairwise distances between experts under one representation."""
    if representation == "weights":
        if stats.weight_gram is None:
            raise UserError("these statistics have no expert weights; recompute them to use --representation weights")
        gram = stats.weight_gram.double()
        diagonal = gram.diagonal()
        if metric == "cosine":
            matrix = 1 - gram / torch.sqrt(torch.outer(diagonal, diagonal)).clamp(min=1e-300)
        else:
            matrix = (diagonal[:, None] + diagonal[None, :] - 2 * gram).clamp(min=0).sqrt()
        matrix.fill_diagonal_(0)
        return squareform(((matrix + matrix.T) / 2).numpy(), checks=False)
    return pdist(expert_features(stats, representation).numpy(), metric=metric)


def expert_features(stats: LayerStats, representation: str) -> torch.Tensor:
    """One row per expert: its mean output, or its column of router logits over the calibration tokens."""
    if representation == "expert-output":
        return stats.mean_output.double()
    if representation == "router-logits":
        if stats.router_weight is None or stats.router_inputs.numel() == 0:
            raise UserError("these statistics have no router inputs; recompute them to use router logits")
        return (stats.router_inputs.double() @ stats.router_weight.double().T).T
    raise UserError(f"unknown representation {representation!r}; choose one of: {', '.join(REPRESENTATIONS)}")


def check_merge_options(merge: str, metric: str, representation: str) -> None:
    if merge not in MERGES:
        raise UserError(f"unknown merge {merge!r}; choose one of: {', '.join(MERGES)}")
    if metric not in METRICS:
        raise UserError(f"unknown distance {metric!r}; choose one of: {', '.join(METRICS)}")
    if representation not in REPRESENTATIONS:
        raise UserError(f"unknown representation {representation!r}; choose one of: {', '.join(REPRESENTATIONS)}")


class HCSMoE:
    """HC-SMoE: agglomerative clustering of experts (by mean output by default), then one merge per cluster."""

    name = "hc-smoe"

    def __init__(self, linkage: str = "average", metric: str = "euclidean", merge: str = "frequency",
                 representation: str = "expert-output", max_group_size: int | None = None):
        if linkage not in LINKAGES:
            raise UserError(f"unknown linkage {linkage!r}; choose one of: {', '.join(LINKAGES)}")
        check_merge_options(merge, metric, representation)
        if linkage == "ward" and metric != "euclidean":
            raise UserError("ward linkage needs the euclidean distance; use --metric euclidean")
        if max_group_size is not None and max_group_size < 1:
            raise UserError(f"--max-group-size must be at least 1, got {max_group_size}")
        self.linkage, self.metric, self.merge, self.representation = linkage, metric, merge, representation
        self.max_group_size = max_group_size

    def options(self) -> dict:
        return {"linkage": self.linkage, "metric": self.metric, "merge": self.merge,
                "representation": self.representation, "max_group_size": self.max_group_size}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        distances = expert_distances(stats, self.representation, self.metric)
        n = stats.num_experts
        if self.max_group_size is None or self.max_group_size >= n - k + 1:
            tree = scipy_linkage(distances, method=self.linkage)
        else:
            tree = capped_linkage(distances, n, self.linkage, self.max_group_size, k)
        groups = groups_from_linkage(tree, n, k)
        return LayerPlan(
            layer=stats.layer,
            num_experts=stats.num_experts,
            groups=[make_group(g, stats, self.merge) for g in groups],
            details={"linkage_matrix": tree.tolist(), "distances": squareform(distances).round(6).tolist()},
        )


def capped_linkage(distances: np.ndarray, n: int, method: str, cap: int, k: int) -> np.ndarray:
    """Agglomerative clustering as scipy does it, except that none of the first n - k merges may make a
    group of more than `cap` experts: the closest allowed pair merges next. The remaining merges (beyond
    the k groups, for the dendrogram only) are unconstrained. Returns a scipy-format linkage matrix.

    Why: on expert outputs, average linkage can chain half a layer into one group whose single merged
    expert then replaces experts that carried most of the routing.
    """
    if cap * k < n:
        raise UserError(f"{k} groups of at most {cap} experts cannot hold {n} experts; raise --max-group-size")
    square = squareform(distances).astype(np.float64)
    if method == "ward":
        square = square**2
    np.fill_diagonal(square, np.inf)
    sizes = np.ones(n, dtype=np.int64)
    active = np.ones(n, dtype=bool)
    ids = np.arange(n)
    rows = []
    for step in range(n - 1):
        limit = cap if step < n - k else n
        allowed = active[:, None] & active[None, :] & (sizes[:, None] + sizes[None, :] <= limit)
        candidates = np.where(np.triu(allowed, 1), square, np.inf)
        a, b = np.unravel_index(np.argmin(candidates), candidates.shape)
        d_ab = square[a, b]
        square[a, :] = square[:, a] = _lance_williams(method, square[a], square[b], d_ab, sizes[a], sizes[b], sizes)
        square[a, a] = np.inf
        square[b, :] = square[:, b] = np.inf
        rows.append([min(ids[a], ids[b]), max(ids[a], ids[b]), np.sqrt(d_ab) if method == "ward" else d_ab,
                     sizes[a] + sizes[b]])
        sizes[a] += sizes[b]
        active[b] = False
        ids[a] = n + step
    return np.array(rows, dtype=np.float64)


def _lance_williams(method: str, d_a: np.ndarray, d_b: np.ndarray, d_ab: float, n_a: int, n_b: int,
                    sizes: np.ndarray) -> np.ndarray:
    """Distance from the merged group a+b to every other group (ward on squared distances)."""
    if method == "single":
        return np.minimum(d_a, d_b)
    if method == "complete":
        return np.maximum(d_a, d_b)
    if method == "average":
        return (n_a * d_a + n_b * d_b) / (n_a + n_b)
    total = n_a + n_b + sizes
    return ((n_a + sizes) * d_a + (n_b + sizes) * d_b - sizes * d_ab) / total


class KMeans:
    """k-means (k-means++ seeding, seeded) on the experts' mean outputs, then a weighted merge per cluster."""

    name = "kmeans"

    def __init__(self, seed: int = 0, merge: str = "frequency", iterations: int = 100):
        check_merge_options(merge, "euclidean", "expert-output")
        self.seed, self.merge, self.iterations = seed, merge, iterations

    def options(self) -> dict:
        return {"seed": self.seed, "merge": self.merge, "iterations": self.iterations}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        features = stats.mean_output.double().numpy()
        rng = np.random.default_rng(self.seed * 100003 + stats.layer)
        centroids, labels = kmeans2(features, k, iter=self.iterations, minit="++", missing="warn", rng=rng)
        labels = fill_empty_clusters(features, centroids, labels, k)
        groups = sorted((np.flatnonzero(labels == c).tolist() for c in range(k)), key=lambda g: g[0])
        return LayerPlan(stats.layer, stats.num_experts, [make_group(g, stats, self.merge) for g in groups],
                         details={"labels": labels.tolist()})


def fill_empty_clusters(features: np.ndarray, centroids: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Exactly k non-empty clusters: each empty one takes the point farthest from its own centroid."""
    labels = labels.copy()
    for cluster in range(k):
        if (labels == cluster).any():
            continue
        sizes = np.bincount(labels, minlength=k)
        movable = np.flatnonzero(sizes[labels] > 1)
        errors = ((features[movable] - centroids[labels[movable]]) ** 2).sum(1)
        labels[movable[int(np.argmax(errors))]] = cluster
    return labels


class MSMoE:
    """M-SMoE (Li et al., ICLR 2024): the K most-used experts are dominant; every other expert joins the
    dominant expert whose router-logit column is most similar (cosine); frequency-weighted merge."""

    name = "m-smoe"

    def __init__(self, merge: str = "frequency"):
        check_merge_options(merge, "cosine", "router-logits")
        self.merge = merge

    def options(self) -> dict:
        return {"merge": self.merge}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        dominant = top_experts(stats.counts, k)
        columns = torch.nn.functional.normalize(expert_features(stats, "router-logits"), dim=1)
        similarity = columns @ columns[dominant].T  # [E, K]
        groups: dict[int, list[int]] = {d: [d] for d in dominant}
        for expert in range(stats.num_experts):
            if expert not in groups:
                groups[dominant[int(similarity[expert].argmax())]].append(expert)
        ordered = sorted(groups.values(), key=min)
        return LayerPlan(stats.layer, stats.num_experts, [make_group(g, stats, self.merge) for g in ordered],
                         details={"dominant": sorted(dominant)})
