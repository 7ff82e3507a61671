"""Every planner by name, behind one interface (`options()`, `plan_layer(stats, k)`); the planners made of
planners (the per-layer choice, planning within DeepSeek's routing groups); and plans made from them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.errors import UserError
from hcsmoe.planners.clustering import HCSMoE, KMeans, MSMoE
from hcsmoe.planners.plan import PLAN_MERGES, Group, LayerPlan, Plan
from hcsmoe.timing import timed

if TYPE_CHECKING:
    from hcsmoe.recipe import Recipe
import inspect

import torch

from hcsmoe.planners.plan import ROUTERS, check_k
from hcsmoe.planners.pruning import EAN, REAP, FrequencyPrune, OPrune, RandomPrune, SoftPrune
from hcsmoe.planners.ream import REAM
from hcsmoe.planners.stun import STUN


class PerLayerChoice:
    """Several planners; per layer, the fitting stage keeps the plan whose compressed layer reproduces the
    original layer's output best on held-out calibration tokens (fitting.choice.choose_layer_plan). Without that
    stage (plan_layer alone) the first candidate's plan is used."""

    name = "per-layer-choice"

    def __init__(self, candidates: list):
        self.candidates = candidates
        self.merge = getattr(candidates[0], "merge", None)

    def options(self) -> dict:
        return {"candidates": [{"method": c.name, **c.options()} for c in self.candidates]}

    def plan_layer(self, stats: LayerStats, k: int) -> LayerPlan:
        return self.candidates[0].plan_layer(stats, k)

    @timed("plan")
    def candidate_plans(self, stats: LayerStats, k: int, router: str,
                        width: int | None = None) -> list[tuple["Plan", LayerPlan]]:
        """(one-layer plan saying how to merge, layer plan) for every candidate planner."""
        pairs = []
        for candidate in self.candidates:
            layer_plan = candidate.plan_layer(stats, k)
            pairs.append((plan_of(candidate, router, [layer_plan], width), layer_plan))
        return pairs


PLANNERS = {p.name: p for p in (HCSMoE, KMeans, MSMoE, FrequencyPrune, SoftPrune, OPrune, REAP, EAN, RandomPrune,
                                REAM, STUN)}


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


def plan_model(layer_stats: list[LayerStats], k: int, top_k: int, planner, router: str = "dominant",
               width: int | None = None) -> Plan:
    """Apply one planner to every layer with the same target k."""
    if router not in ROUTERS:
        raise UserError(f"unknown router method {router!r}; choose one of: {', '.join(ROUTERS)}")
    for stats in layer_stats:
        check_k(k, stats.num_experts, top_k)
    return plan_of(planner, router, [planner.plan_layer(stats, k) for stats in layer_stats], width)


def plan_of(planner, router: str, layers: list[LayerPlan], width: int | None = None) -> Plan:
    """The plan a planner made, layer by layer (fix-dom and aligned planners mark it for neuron-level merging;
    `width`: the neurons each expert keeps, --width)."""
    return Plan(method=planner.name, options=planner.options(), router=router, layers=layers,
                merge=planner_merge(planner), width=width)


def plan_with_layers(given: Plan | None, planner, recipe: "Recipe", layer_plans: list[LayerPlan],
                     width: int | None = None) -> Plan:
    """The plan as applied: the given one or the planner's, with each layer's fit reports, how it was fitted
    and the whole (resolved) recipe."""
    plan = replace(given, layers=layer_plans) if given is not None else plan_of(planner, recipe.router, layer_plans,
                                                                                 width)
    plan.refit = recipe.refit.to_dict() if recipe.refit is not None else None
    plan.router_fit = recipe.router_fit.to_dict() if recipe.router_fit is not None else None
    plan.sequential, plan.recipe = recipe.sequential, recipe.to_dict()
    return plan


def planner_merge(planner) -> str:
    """How apply merges this planner's groups: neuron by neuron (fix-dom, aligned) or weighted."""
    merge = getattr(planner, "merge", None)
    return merge if merge in PLAN_MERGES else "weighted"
