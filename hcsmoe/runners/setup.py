"""What every runner settles before any work: K, the planner, the fits that apply, the output dtype.

Everything a user can get wrong (K, options a method does not take, a fit the family cannot have, a plan
that does not cover the model) is refused here, before calibration starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from hcsmoe import __version__
from hcsmoe.apply.narrow import MXFP4_WIDTH_MULTIPLE, WIDTH_MULTIPLE, resolve_width
from hcsmoe.calibration.statistics import Statistics
from hcsmoe.checkpoints.architectures import (
    Architecture,
    MoELayer,
    architecture_for,
    check_k_for,
    expert_width,
    group_limits,
    shared_width,
    top_k,
    width_fits,
)
from hcsmoe.checkpoints.formats import Format, Mxfp4, Plain
from hcsmoe.checkpoints.loading import STORED, parse_dtype
from hcsmoe.errors import UserError
from hcsmoe.fitting.router_fit import check_router_fit
from hcsmoe.planners.plan import Plan, check_k
from hcsmoe.planners.registry import PerLayerChoice, WithinRoutingGroups, make_planner, planner_merge
from hcsmoe.recipe import DEFAULT_CANDIDATES, Recipe


@dataclass
class Job:
    """One compression, settled: the resolved recipe (with only the fits that apply), the model's shape, K,
    the planner (None when a given plan is re-applied) and the dtype the weights are saved in (None: the
    input's quantized format)."""

    recipe: Recipe
    architecture: Architecture
    num_experts: int
    top_k: int
    kept: int
    output_dtype: torch.dtype | None
    planner: object | None
    plan: Plan | None
    fmt: Format = field(default_factory=Plain)
    width: int | None = None  # neurons each routed expert keeps (--width; None: all)

    @property
    def fitting(self) -> bool:
        return self.recipe.refit is not None or self.recipe.router_fit is not None

    @property
    def merge(self) -> str:
        """How stage 3 merges a group ("weighted" needs no calibration without fits)."""
        return self.plan.merge if self.plan is not None else planner_merge(self.planner)

    def needs_calibration(self, stats: Statistics | None) -> bool:
        """Whether the model must be run: no statistics given, and a plan to make, an lsq router, a
        neuron-level merge or a fit."""
        return stats is None and (self.plan is None or self.plan.router == "lsq" or self.fitting
                                  or self.merge != "weighted" or self.width is not None
                                  or self.recipe.sparsity is not None)

    @property
    def with_weight_gram(self) -> bool:
        """Whether the statistics must hold the experts' weight Gram matrix (weight-space clustering, STUN)."""
        return self.recipe.representation == "weights" or bool(getattr(self.planner, "needs_weight_gram", False))

    def output_samples(self) -> int:
        """Per-token output samples to keep per expert: the recipe's, else what the planner needs."""
        if self.recipe.output_samples is not None:
            return self.recipe.output_samples
        return 512 if getattr(self.planner, "needs_output_samples", False) else 0

    def info(self, source, plan: Plan, timings: dict) -> dict:
        """What the run did, for the model card and the summary."""
        return {
            "source": str(source) if source else None,
            "architecture": self.architecture.name,
            "experts_before": self.num_experts,
            "experts_after": len(plan.layers[0].groups),
            "top_k": self.top_k,
            "dtype": saved_format(self.fmt, self.output_dtype),
            "seed": self.recipe.seed,
            "seconds": {name: round(value, 3) for name, value in timings.items()},
            "hcsmoe_version": __version__,
        }


def prepare(config, layers: list[MoELayer], recipe: Recipe, plan: Plan | None, stats: Statistics | None,
            output_dtype: torch.dtype | None, fmt: Format, num_experts: int) -> Job:
    """The Job of a resolved recipe on a model with these MoE layers (built or on the meta device)."""
    architecture = architecture_for(config)
    k_route = top_k(config, architecture)
    k = len(plan.layers[0].groups) if plan is not None else recipe.kept(num_experts)
    check_k(k, num_experts, k_route)
    check_k_for(config, architecture, k)
    if plan is not None:
        check_plan_layers(plan, layers)
    recipe = dataclasses.replace(recipe, router_fit=fits_that_apply(architecture, stats, recipe))
    multiple = MXFP4_WIDTH_MULTIPLE if isinstance(fmt, Mxfp4) and output_dtype is None else WIDTH_MULTIPLE
    width = resolve_width(recipe.width, expert_width(layers[0].experts, architecture), multiple)
    if width is not None and not width_fits(config, architecture, width):
        raise UserError(width_refusal(config, architecture, width, multiple))
    planner = None
    if plan is None:
        context = {"seed": recipe.seed, "max_subsets": recipe.max_subsets, "top_k": k_route,
                   "norm_topk_prob": normalizes_top_k(layers)}
        planner = build_planner(recipe, config, architecture, context)
    return Job(recipe, architecture, num_experts, k_route, k, output_dtype, planner, plan, fmt, width)


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint was saved in (float32 when the config does not say)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


def normalizes_top_k(layers: list[MoELayer]) -> bool:
    """Whether the routers renormalise the top-k weights (Mixtral's always do and have no flag)."""
    return bool(getattr(layers[0].router, "norm_topk_prob", True))


def build_planner(recipe: Recipe, config, architecture: Architecture, context: dict):
    """The planner for a named method, or the default recipe's per-layer choice (user options go to its
    merging candidate); with group-limited routing, each candidate plans each routing group on its own."""
    options = recipe.planner_options()
    if recipe.method is None:
        (merging, defaults), *others = DEFAULT_CANDIDATES
        chosen = defaults | {k: v for k, v in options.items() if v is not None}
        candidates = [make_planner(merging, **chosen, **context)]
        candidates += [make_planner(name, **extra, **context) for name, extra in others]
        return PerLayerChoice([within_routing_groups(c, config, architecture) for c in candidates])
    return within_routing_groups(make_planner(recipe.method, **options, **context), config, architecture)


def within_routing_groups(planner, config, architecture: Architecture):
    """With group-limited routing (DeepSeek), plan each routing group on its own."""
    limits = group_limits(config, architecture)
    return WithinRoutingGroups(planner, limits[0]) if limits and limits[0] > 1 else planner


def saved_format(fmt: Format, output_dtype: torch.dtype | None) -> str:
    if output_dtype is not None:
        return str(output_dtype).removeprefix("torch.")
    return f"{fmt.description} as in the input, other tensors in their stored dtype"


def held_dtype(fmt: Format, output_dtype: torch.dtype | None, config) -> str:
    """How the in-memory path holds the model: as stored when the output keeps the checkpoint's dtype (a bf16
    model stays bf16, each layer computed in float32 in turn: one copy of the weights), else in float32."""
    return STORED if not fmt.quantized and output_dtype == checkpoint_dtype(config) else "float32"


def output_dtype_for(fmt: Format, dtype: str | None, config) -> torch.dtype | None:
    """--dtype when given; else the checkpoint's dtype, or None (keep the stored format) for a quantized one."""
    if dtype:
        return parse_dtype(dtype)
    return None if fmt.quantized else checkpoint_dtype(config)


def check_plan_layers(plan: Plan, layers: list[MoELayer]) -> None:
    """A given plan must cover every MoE layer with one expert count (checked before any work)."""
    plan.validate()
    planned = {lp.layer: len(lp.groups) for lp in plan.layers}
    missing = [m.index for m in layers if m.index not in planned]
    if missing:
        raise UserError(f"the plan has no entry for MoE layers {missing}")
    if len({planned[m.index] for m in layers}) != 1:
        raise UserError(f"the plan keeps different expert counts per layer ({sorted(set(planned.values()))}); "
                        "the config allows one")


def fits_that_apply(architecture: Architecture, stats: Statistics | None, recipe: Recipe):
    """Refuse fitting what cannot be fitted, before any work; returns the router fit that applies (the
    default recipe's is skipped for a family whose routing it does not cover)."""
    router_fit = recipe.router_fit
    if router_fit is not None and router_fit.only_if_softmax and not router_fit.covers(architecture):
        router_fit = None
    if stats is not None and recipe.sparsity is not None:
        raise UserError("--sparsity weighs weights by the inputs the compressed layers see, which a statistics file "
                        "does not hold; drop --stats")
    if stats is not None and (recipe.refit is not None or router_fit is not None):
        raise UserError("fitting the compressed layers needs the model's per-token outputs, which a statistics file "
                        "does not hold; drop --stats, or add --no-refit --no-fit-router to re-plan from it")
    if router_fit is not None:
        check_router_fit(architecture, router_fit)
    return router_fit


def record_size(plan: Plan, timings: dict[str, float], size: dict | None) -> None:
    """Put --size's record of how the shape was chosen (sizing.choose_shape) in the plan, and its time with the
    run's stage times."""
    if size is not None:
        plan.size, timings["choose size"] = size, size["seconds"]


def width_refusal(config, architecture: Architecture, width: int, multiple: int) -> str:
    """Why the config cannot hold routed experts `width` wide, and what to do."""
    if architecture.width_key is None:
        return (f"--width: {architecture.name}'s shared experts take their width from the config key of its routed "
                "experts, so a checkpoint with narrower routed experts would not load; drop --width")
    shared = shared_width(config, architecture)
    fitting = [w for w in range(multiple, shared, multiple) if shared % w == 0]
    return (f"--width {width}: {architecture.name}'s shared experts are {architecture.width_key} x "
            f"{architecture.shared_count_key} = {shared} wide, so the routed width must divide {shared}; choose one of "
            f"{', '.join(map(str, fitting[-4:])) or 'none'}")
