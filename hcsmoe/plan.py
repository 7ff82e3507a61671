"""Step 2: decide, per layer, which experts become one and with what weights.

A plan is plain data: for every MoE layer, a list of groups, each a list of original experts and
their merge weights. Merging methods put every expert in some group; pruning methods leave the
dropped experts out and keep the others as groups of one. Plans save as readable JSON and can be
edited and re-applied.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import itertools
import math

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.cluster.vq import kmeans2
from scipy.spatial.distance import pdist, squareform

from hcsmoe.calibrate import LayerStats
from hcsmoe.errors import UserError

PLAN_FORMAT = "hcsmoe-plan/1"
LINKAGES = ("average", "single", "complete", "ward")
METRICS = ("euclidean", "cosine")
MERGES = ("frequency", "average", "fix-dom", "aligned", "select", "select-energy")
PLAN_MERGES = ("weighted", "fix-dom", "aligned", "select", "select-energy")  # how apply merges a group: see apply.py
ASSIGNMENTS = ("greedy", "nearest")
ROUTERS = ("average", "dominant", "lsq")
REPRESENTATIONS = ("expert-output", "router-logits", "weights")


@dataclass
class Group:
    members: list[int]  # original expert indices
    weights: list[float]  # merge weight of each member (sum to one)
    frequencies: list[float]  # each member's share of routing, for the reader


@dataclass
class LayerPlan:
    layer: int
    num_experts: int  # experts before compression
    groups: list[Group]
    details: dict = field(default_factory=dict)  # method-specific: linkage matrix, distances, scores

    @property
    def dropped(self) -> list[int]:
        kept = {m for g in self.groups for m in g.members}
        return [e for e in range(self.num_experts) if e not in kept]


@dataclass
class Plan:
    method: str
    options: dict
    router: str
    layers: list[LayerPlan]
    # "weighted": weighted average of members; "fix-dom": neurons folded onto the dominant member's;
    # "aligned": members' neurons permuted one-to-one onto the anchor's (Hungarian), then weighted average;
    # "select": the members' neurons that, with fitted down columns, best reproduce the group's output (least
    # squares, for a refit of the down projection); "select-energy": the neurons with the most output energy, unchanged
    merge: str = "weighted"
    refit: dict | None = None  # options of the down-projection refit applied after merging (None: not refitted)
    router_fit: dict | None = None  # options of the router fit applied after merging (None: rows as `router` made them)
    sequential: bool | str = False  # layers calibrated and fitted on the compressed layers' outputs ("corrective": see refit)
    world_size: int = 1  # processes that computed it (torchrun); each layer's details["ranks"] says who did what
    format: str = PLAN_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise UserError(f"not an hcsmoe plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        layers = [
            LayerPlan(
                layer=entry["layer"],
                num_experts=entry["num_experts"],
                groups=[Group(**g) for g in entry["groups"]],
                details=entry.get("details", {}),
            )
            for entry in data["layers"]
        ]
        return cls(method=data["method"], options=data["options"], router=data["router"], layers=layers,
                   merge=data.get("merge", "weighted"), refit=data.get("refit"), router_fit=data.get("router_fit"),
                   sequential=data.get("sequential", False), world_size=data.get("world_size", 1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"plan file {path} not found")
        except json.JSONDecodeError:
            raise UserError(f"plan file {path} is not valid JSON")
        plan = cls.from_dict(data)
        plan.validate()
        return plan

    def validate(self) -> None:
        """Every group non-empty, members in range and used once, weights summing to one."""
        if self.router not in ROUTERS:
            raise UserError(f"unknown router method {self.router!r}; choose one of: {', '.join(ROUTERS)}")
        if self.merge not in PLAN_MERGES:
            raise UserError(f"unknown plan merge {self.merge!r}; use one of: {', '.join(PLAN_MERGES)}")
        for layer in self.layers:
            seen: set[int] = set()
            if not layer.groups:
                raise UserError(f"plan layer {layer.layer} has no groups")
            for group in layer.groups:
                if not group.members or len(group.members) != len(group.weights):
                    raise UserError(f"plan layer {layer.layer}: every group needs members and one weight each")
                if any(m < 0 or m >= layer.num_experts or m in seen for m in group.members):
                    raise UserError(f"plan layer {layer.layer}: expert indices out of range or used twice")
                if abs(sum(group.weights) - 1.0) > 1e-4:
                    raise UserError(f"plan layer {layer.layer}: merge weights of group {group.members} do not sum to one")
                seen.update(group.members)


def merge_weights(members: list[int], frequency: torch.Tensor, merge: str) -> list[float]:
    """Frequency-weighted (uniform when the group was never routed to) or plain average weights.

    fix-dom also uses frequency weights: they weigh the neurons folded onto the dominant expert.
    """
    if merge == "average":
        return [1.0 / len(members)] * len(members)
    f = frequency[members].double()
    if f.sum() <= 0:
        return [1.0 / len(members)] * len(members)
    return (f / f.sum()).tolist()


def make_group(members: list[int], stats: LayerStats, merge: str) -> Group:
    members = sorted(members)
    frequency = stats.frequency
    return Group(members, merge_weights(members, frequency, merge), [float(frequency[m]) for m in members])


def groups_from_linkage(linkage_matrix: np.ndarray, n: int, k: int) -> list[list[int]]:
    """Exactly k clusters: replay the first n - k merges of the tree (no criterion that can return fewer)."""
    clusters: dict[int, list[int]] = {i: [i] for i in range(n)}
    for step in range(n - k):
        a, b = int(linkage_matrix[step, 0]), int(linkage_matrix[step, 1])
        clusters[n + step] = clusters.pop(a) + clusters.pop(b)
    return sorted((sorted(c) for c in clusters.values()), key=lambda c: c[0])


def check_k(k: int, num_experts: int, top_k: int) -> None:
    if k <= 0:
        raise UserError(f"number of experts must be positive, got {k}")
    if k > num_experts:
        raise UserError(f"cannot keep {k} experts: the layer has only {num_experts}")
    if k < top_k:
        raise UserError(f"cannot keep {k} experts: the model routes every token to {top_k}; keep at least {top_k}")


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


class PerLayerChoice:
    """Several planners; per layer, the fitting stage keeps the plan whose compressed layer reproduces the
    original layer's output best on held-out calibration tokens (refit.choose_layer_plan). Without that
    stage (plan_layer alone) the first candidate's plan is used."""

    name = "per-layer-choice"

    def __init__(self, candidates: list):
        self.candidates = candidates
        self.merge = getattr(candidates[0], "merge", None)

    def options(self) -> dict:
        return {"candidates": [{"method": c.name, **c.options()} for c in self.candidates]}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        return self.candidates[0].plan_layer(stats, k)

    def candidate_plans(self, stats: LayerStats, k: int, router: str) -> list[tuple["Plan", LayerPlan]]:
        """(one-layer plan saying how to merge, layer plan) for every candidate planner."""
        pairs = []
        for candidate in self.candidates:
            layer_plan = candidate.plan_layer(stats, k)
            pairs.append((plan_of(candidate, router, [layer_plan]), layer_plan))
        return pairs


PLANNERS = {p.name: p for p in (HCSMoE, KMeans, MSMoE, FrequencyPrune, SoftPrune, OPrune, REAP, EAN, RandomPrune,
                                REAM)}


def stats_subset(stats: LayerStats, members: list[int]) -> LayerStats:
    """The statistics of some experts of a layer, as if the layer had only those."""
    index = torch.tensor(members)

    def pick(tensor: torch.Tensor | None, square: bool = False) -> torch.Tensor | None:
        if tensor is None:
            return None
        return tensor[index][:, index] if square else tensor[index]

    return replace(stats, mean_output=pick(stats.mean_output), counts=pick(stats.counts),
                   mean_router_prob=pick(stats.mean_router_prob), router_weight=pick(stats.router_weight),
                   reap=pick(stats.reap), ean=pick(stats.ean), weight_gram=pick(stats.weight_gram, square=True),
                   sample_outputs=pick(stats.sample_outputs), gated_mean_output=pick(stats.gated_mean_output))


class WithinRoutingGroups:
    """Any planner, run on each of a layer's routing groups alone (DeepSeek's n_group, k / n_group experts
    kept per group), so that merged expert g lies in routing group g // (k / n_group) and is made of experts
    that group-limited routing chose among together."""

    def __init__(self, planner, groups: int):
        self.planner, self.groups = planner, groups

    def __getattr__(self, name):
        return getattr(self.planner, name)

    def options(self) -> dict:
        return self.planner.options() | {"routing_groups": self.groups}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        size, kept = stats.num_experts // self.groups, k // self.groups
        frequency, groups, details = stats.frequency, [], []
        for block in range(self.groups):
            members = list(range(block * size, (block + 1) * size))
            sub = self.planner.plan_layer(stats_subset(stats, members), kept)
            for group in sub.groups:
                original = [members[m] for m in group.members]
                groups.append(Group(original, group.weights, [float(frequency[m]) for m in original]))
            details.append({"experts": members, "details": sub.details})
        return LayerPlan(stats.layer, stats.num_experts, groups, details={"routing_groups": details})


# What the pipeline tells every planner that can use it (not a user's choice, so never refused).
CONTEXT_OPTIONS = ("seed", "max_subsets", "top_k", "norm_topk_prob")


def make_planner(method: str, **options):
    """A planner by name with the options given (None: the planner's default). A method option the planner
    does not take is refused, so that e.g. --linkage with a pruning method is not silently ignored."""
    if method not in PLANNERS:
        raise UserError(f"unknown method {method!r}; choose one of: {', '.join(PLANNERS)}")
    accepted = inspect.signature(PLANNERS[method]).parameters
    given = {k: v for k, v in options.items() if v is not None}
    unused = sorted(k for k in given if k not in accepted and k not in CONTEXT_OPTIONS)
    if unused:
        flags = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise UserError(f"{flags} do{'es' if len(unused) == 1 else ''} not apply to --method {method}; "
                        f"drop {'it' if len(unused) == 1 else 'them'} or choose a method that takes "
                        f"{'it' if len(unused) == 1 else 'them'}")
    return PLANNERS[method](**{k: v for k, v in given.items() if k in accepted})


def plan_model(layer_stats: list[LayerStats], k: int, top_k: int, planner, router: str = "dominant") -> Plan:
    """Apply one planner to every layer with the same target k."""
    if router not in ROUTERS:
        raise UserError(f"unknown router method {router!r}; choose one of: {', '.join(ROUTERS)}")
    for stats in layer_stats:
        check_k(k, stats.num_experts, top_k)
    return plan_of(planner, router, [planner.plan_layer(stats, k) for stats in layer_stats])


def plan_of(planner, router: str, layers: list[LayerPlan]) -> Plan:
    """The plan a planner made, layer by layer (fix-dom and aligned planners mark it for neuron-level merging)."""
    return Plan(method=planner.name, options=planner.options(), router=router, layers=layers,
                merge=planner_merge(planner))


def plan_with_layers(given: Plan | None, planner, router: str, layer_plans: list[LayerPlan],
                     refit: dict | None, router_fit: dict | None, sequential: bool | str) -> Plan:
    """The plan as applied: the given one or the planner's, with each layer's fit reports and how it was fitted."""
    plan = replace(given, layers=layer_plans) if given is not None else plan_of(planner, router, layer_plans)
    plan.refit, plan.router_fit, plan.sequential = refit, router_fit, sequential
    return plan


def planner_merge(planner) -> str:
    """How apply merges this planner's groups: neuron by neuron (fix-dom, aligned) or weighted."""
    merge = getattr(planner, "merge", None)
    return merge if merge in PLAN_MERGES else "weighted"
