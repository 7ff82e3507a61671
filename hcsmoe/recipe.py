"""One recipe: what a compression makes, whether it comes from CLI flags, a YAML file, a plan or Python.

A `Recipe` names the experts to keep, the planner (stage 2) and its options, the calibration (stage 1), how
groups become experts (stage 3), the fits (stage 4) and the saved dtype (stage 5). It is validated once,
resolved once against the default recipe, and then passed whole to the stages; the plan records it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from hcsmoe.errors import UserError
from hcsmoe.fitting.distill import DistillOptions
from hcsmoe.fitting.refit import RefitOptions
from hcsmoe.fitting.router_fit import RouterFitOptions
from hcsmoe.planners.plan import ROUTERS, Plan

# English, French and Spanish train text interleaved: on held-out train text of the reference model it
# beats English-only calibration even on English at 50% removed (benchmarks/results/choices-*.md).
DEFAULT_CALIBRATION = "wiki:en,fr,es"

# The default size: half of the routed experts' parameters, in the shape (experts x neurons) that --size finds
# best. On both bundled models it keeps every expert at half its width: mean ppl ratio 1.050 and 1.017 on full
# validation against 1.068 and 1.036 for half the experts (benchmarks/results/size-*.md).
DEFAULT_SIZE = 0.5

# The default compressor, chosen on held-out train text of both bundled models (benchmarks/choices.py): per
# layer, the better on held-out calibration tokens of two plans, each fitted to the original layer (router
# fit, then down-projection refit): the K most salient experts (REAP) anchoring pairs whose merged expert
# keeps the members' neurons that best reproduce the pair's output (least squares), or REAP's pruning; the
# winner's experts are then fitted to the original layer (EXPERT_FIT_STEPS whitened L-BFGS steps; --fast:
# none, the closed-form recipe). Options a recipe leaves unset take these values when it names no method.
DEFAULT_CANDIDATES = (("ream", {"merge": "select", "group_size": 0, "assignment": "nearest"}), ("reap", {}))
EXPERT_FIT_STEPS = 30
DEFAULT_REFIT = RefitOptions(steps=EXPERT_FIT_STEPS)
FAST_REFIT = RefitOptions()
DEFAULT_ROUTER_FIT = RouterFitOptions(only_if_softmax=True)
DEFAULT_SEQUENTIAL = "corrective"
SEQUENTIAL_MODES = (False, True, "corrective")
SEQUENTIAL_FLAGS = {None: None, "on": True, True: True, "off": False, False: False, "corrective": "corrective"}

# What a planner may be told by the user (None: the planner's own default).
PLANNER_OPTIONS = ("linkage", "metric", "merge", "group_size", "assignment", "representation", "max_group_size",
                   "similarity")
# The refit's options that have a flag of their own: --refit-alpha, --refit-solver, ... (RefitOptions fields).
REFIT_FLAGS = {"refit_alpha": "alpha", "refit_solver": "solver", "refit_steps": "steps",
               "refit_tokens": "step_tokens", "refit_whiten": "whiten",
               "refit_anchor": "anchor", "choose_fitted": "choose_fitted", "refit_memory": "memory"}


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the compressed weights. None means "the default recipe's value" (or, for a
    named method, the method's own: a named method runs as published, fits only if asked)."""

    experts: int | None = None  # K kept per MoE layer
    ratio: float | None = None  # or: the fraction of experts to remove (0.5 when neither is given)
    method: str | None = None  # a planner by name; None: the default recipe (DEFAULT_CANDIDATES, per layer)
    linkage: str | None = None
    metric: str | None = None
    merge: str | None = None
    group_size: int | None = None
    assignment: str | None = None
    representation: str | None = None
    max_group_size: int | None = None
    similarity: str | None = None  # stun: router (rows' distance) or co-selection
    max_subsets: int | None = None
    router: str = "dominant"  # new router rows: dominant, average or lsq
    output_samples: int | None = None  # per-token output samples kept per expert (None: what the planner needs)
    calibration: str = DEFAULT_CALIBRATION
    blocks: int | None = None  # calibration blocks (None: enough for CALIBRATION_TOKENS)
    block_size: int = 2048
    batch_size: int = 4
    sequential: bool | str | None = None  # False, True or "corrective"
    refit: RefitOptions | bool | None = None  # stage 4: the down-projection refit (and the expert fit, refit.steps)
    router_fit: RouterFitOptions | bool | None = None  # stage 4: the router fit
    dtype: str | None = None  # saved dtype (None: the checkpoint's own; FP8 / MXFP4 stay in their format)
    seed: int = 0
    fast: bool = False  # the default recipe without the expert fit (closed-form fits only)
    width: float | None = None  # neurons each routed expert keeps: a fraction of I in (0, 1] or a count (--width)
    sparsity: float | None = None  # STUN's unstructured stage: share of routed-expert weights zeroed (saves nothing)
    size: float | None = None  # share of the routed experts' parameters kept, shape (K, I2) chosen (hcsmoe/sizing.py)
    distill: DistillOptions | None = None  # stage 4, end to end (opt-in): all MoE layers fitted to the original's output

    def __post_init__(self):
        if self.experts is not None and self.ratio is not None:
            raise UserError("give either --experts or --ratio, not both")
        if self.ratio is not None and not 0.0 < float(self.ratio) < 1.0:
            raise UserError(f"--ratio is the fraction of experts to remove and must lie in (0, 1), got {self.ratio}")
        if self.size is not None and not 0.0 < float(self.size) < 1.0:
            raise UserError(f"--size is the share of the routed experts' parameters to keep, in (0, 1); got {self.size}")
        if self.size is not None and (self.experts is not None or self.ratio is not None or self.width is not None):
            raise UserError("--size chooses the number of experts and their width: give it alone, or --experts / "
                            "--ratio with --width")
        if self.router not in ROUTERS:
            raise UserError(f"unknown router method {self.router!r}; choose one of: {', '.join(ROUTERS)}")
        if self.sequential not in (None, *SEQUENTIAL_MODES):
            raise UserError(f"unknown sequential mode {self.sequential!r}; use True, False or 'corrective'")
        if self.distill is not None and (self.distill.steps < 1 or self.distill.batch < 1 or not self.distill.lr > 0):
            raise UserError("--distill-steps and the stage's batch must be positive integers and --distill-lr positive")

    def kept(self, num_experts: int) -> int:
        """K: --experts, or what --ratio (half by default) leaves of `num_experts`."""
        if self.experts is not None:
            return int(self.experts)
        ratio = 0.5 if self.ratio is None else float(self.ratio)
        return num_experts - round(ratio * num_experts)

    def size_to_choose(self, with_plan: bool = False, with_stats: bool = False) -> float | None:
        """The share of the routed parameters whose shape --size chooses: --size, or DEFAULT_SIZE when nothing
        else sets the shape (no --experts, --ratio, --width or named method). None when re-applying a plan (it
        holds its shape) or re-planning from a statistics file (no text to compress the probes with)."""
        if with_plan or with_stats:
            return None
        if self.size is not None:
            return self.size
        if self.method is None and self.experts is None and self.ratio is None and self.width is None:
            return DEFAULT_SIZE
        return None

    def planner_options(self) -> dict:
        """The options given to the planner (unset ones omitted)."""
        return {name: getattr(self, name) for name in PLANNER_OPTIONS}

    def following(self, plan: Plan | None) -> "Recipe":
        """Re-applying a plan: its method, fits and sequential mode, unless this recipe says otherwise."""
        if plan is None:
            return self
        refit = (RefitOptions(**plan.refit) if plan.refit else False) if self.refit is None else self.refit
        router_fit = ((RouterFitOptions.from_dict(plan.router_fit) if plan.router_fit else False)
                      if self.router_fit is None else self.router_fit)
        distill = DistillOptions(**plan.distill["options"]) if self.distill is None and plan.distill else self.distill
        return dataclasses.replace(self, method=self.method or plan.method, refit=refit, router_fit=router_fit,
                                   sequential=plan.sequential if self.sequential is None else self.sequential,
                                   width=plan.width if self.width is None else self.width, distill=distill)

    def resolved(self, replanning: bool = False) -> "Recipe":
        """Every fit settled: the default recipe's when no method is named, a named method's only if asked
        for (True: the fit's own defaults); None / False mean no such fit. `replanning` (from a statistics
        file, no layer is run): nothing is sequential unless asked."""
        if self.method is None:
            refit = default_refit(self.fast) if self.refit is None or self.refit is True else self.refit
            router_fit = DEFAULT_ROUTER_FIT if self.router_fit is None or self.router_fit is True else self.router_fit
        else:
            refit = RefitOptions() if self.refit is True else self.refit
            router_fit = RouterFitOptions() if self.router_fit is True else self.router_fit
        sequential = self.sequential
        if sequential is None:
            sequential = DEFAULT_SEQUENTIAL if self.method is None and not replanning else False
        return dataclasses.replace(self, refit=refit or None, router_fit=router_fit or None, sequential=sequential)

    def to_dict(self) -> dict:
        """Plain data for the plan JSON (fits as their options' dicts)."""
        data = dataclasses.asdict(self)
        for name in ("refit", "router_fit", "distill"):
            value = getattr(self, name)
            data[name] = value.to_dict() if hasattr(value, "to_dict") else value
        return data

    @classmethod
    def from_options(cls, options: dict) -> "Recipe":
        """The recipe of `hcsmoe compress` options (CLI flags or YAML keys, underscores): --refit-* flags tune
        the default recipe's refit (--fast: without the expert fit; a named method's: the refit's own
        defaults); --no-refit turns it off."""
        return cls(
            experts=options.get("experts"), ratio=options.get("ratio"), method=options.get("method"),
            **{name: options.get(name) for name in (*PLANNER_OPTIONS, "max_subsets")},
            router=given(options, "router", cls.router), calibration=given(options, "calibration", cls.calibration),
            blocks=options.get("blocks"), block_size=given(options, "block_size", cls.block_size),
            batch_size=given(options, "batch_size", cls.batch_size), sequential=sequential_mode(options.get("sequential")),
            refit=refit_from_options(options), router_fit=options.get("fit_router"),
            dtype=options.get("dtype"), seed=given(options, "seed", cls.seed), fast=bool(options.get("fast")),
            width=options.get("width"), sparsity=options.get("sparsity"), size=options.get("size"),
            distill=distill_from_options(options),
        )


def given(options: dict, name: str, default):
    """An option's value, or `default` where it is missing or None."""
    value = options.get(name)
    return default if value is None else value


def default_refit(fast: bool) -> RefitOptions:
    """The default recipe's refit: with the expert fit, or (`fast`) the closed-form refit alone."""
    return FAST_REFIT if fast else DEFAULT_REFIT


def sequential_mode(value):
    """--sequential's word (on, off, corrective) or a bool, as the recipe's value."""
    if value not in SEQUENTIAL_FLAGS:
        raise UserError(f"sequential: expected on, off or corrective, got {value!r}")
    return SEQUENTIAL_FLAGS[value]


def refit_from_options(options: dict) -> RefitOptions | bool | None:
    """--no-refit: False; any --refit-* option: those options over the default recipe's refit (a named
    method's: the refit's own defaults), the refit on; else --refit or None."""
    if options.get("refit") is False:
        return False
    tuned = {field: options[flag] for flag, field in REFIT_FLAGS.items() if options.get(flag) is not None}
    base = default_refit(bool(options.get("fast"))) if options.get("method") is None else RefitOptions()
    return dataclasses.replace(base, **tuned) if tuned else options.get("refit")


def distill_from_options(options: dict) -> DistillOptions | None:
    """--distill-steps N (0 or unset: no end-to-end stage), with --distill-lr over the stage's default."""
    steps = options.get("distill_steps")
    if not steps:
        if options.get("distill_lr") is not None:
            raise UserError("--distill-lr sets the end-to-end stage's step size: give --distill-steps too")
        return None
    return DistillOptions(steps=int(steps), lr=given(options, "distill_lr", DistillOptions.lr))


def read_yaml(path: str | Path) -> dict:
    """Options from a YAML recipe file: a mapping whose keys are `hcsmoe compress`'s long option names
    (dashes or underscores); returned with underscores."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"recipe {path} not found")
    except yaml.YAMLError as error:
        raise UserError(f"recipe {path} is not valid YAML ({str(error).splitlines()[0]})")
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}
