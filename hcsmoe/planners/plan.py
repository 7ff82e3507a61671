"""Stage 2, plan: decide, per layer, which experts become one and with what weights.

A plan is plain data: for every MoE layer, a list of groups, each a list of original experts and
their merge weights. Merging methods put every expert in some group; pruning methods leave the
dropped experts out and keep the others as groups of one. Plans save as readable JSON and can be
edited and re-applied.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.errors import UserError

PLAN_FORMAT = "hcsmoe-plan/1"
LINKAGES = ("average", "single", "complete", "ward")
METRICS = ("euclidean", "cosine")
MERGES = ("frequency", "average", "fix-dom", "aligned", "select", "select-energy")
PLAN_MERGES = ("weighted", "fix-dom", "aligned", "select", "select-energy")  # how stage 3 merges a group: see hcsmoe/apply
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

    @classmethod
    def from_dict(cls, entry: dict) -> "LayerPlan":
        return cls(layer=entry["layer"], num_experts=entry["num_experts"],
                   groups=[Group(**g) for g in entry["groups"]], details=entry.get("details", {}))


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
    recipe: dict | None = None  # the whole recipe it was made with (hcsmoe.recipe.Recipe.to_dict())
    width: int | None = None  # neurons every routed expert keeps (--width; None: all of them)
    sparsity: dict | None = None  # --sparsity: OWL-Wanda's per-layer shares of zeroed weights (apply/sparsify.py)
    size: dict | None = None  # --size: the shapes tried, each one's held-out error and the one chosen (sizing.py)
    distill: dict | None = None  # --distill-steps: the end-to-end stage's options and divergence (fitting/distill.py)
    format: str = PLAN_FORMAT

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        if data.get("format") != PLAN_FORMAT:
            raise UserError(f"not an hcsmoe plan (format {data.get('format')!r}, expected {PLAN_FORMAT!r})")
        layers = [LayerPlan.from_dict(entry) for entry in data["layers"]]
        return cls(method=data["method"], options=data["options"], router=data["router"], layers=layers,
                   merge=data.get("merge", "weighted"), refit=data.get("refit"), router_fit=data.get("router_fit"),
                   sequential=data.get("sequential", False), world_size=data.get("world_size", 1),
                   recipe=data.get("recipe"), width=data.get("width"), sparsity=data.get("sparsity"),
                   size=data.get("size"), distill=data.get("distill"))

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


def check_k(k: int, num_experts: int, top_k: int) -> None:
    if k <= 0:
        raise UserError(f"number of experts must be positive, got {k}")
    if k > num_experts:
        raise UserError(f"cannot keep {k} experts: the layer has only {num_experts}")
    if k < top_k:
        raise UserError(f"cannot keep {k} experts: the model routes every token to {top_k}; keep at least {top_k}")


