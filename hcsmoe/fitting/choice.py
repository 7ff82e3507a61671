"""The default recipe's per-layer choice: each candidate plan is applied and fitted (stages 3-4) on 7/8 of
the calibration tokens and scored on the other 1/8; the best one is kept.
"""

from __future__ import annotations

import copy

import torch

from hcsmoe.calibration.statistics import BlockTokens, LayerStats
from hcsmoe.checkpoints.architectures import Architecture
from hcsmoe.distributed import SINGLE, World
from hcsmoe.fitting.refit import RefitOptions, routed_output
from hcsmoe.fitting.router_fit import RouterFitOptions
from hcsmoe.fitting.stage import expert_fit_tokens, fit_compressed_layer, fit_layer_experts, fitted_tensors, split_tokens
from hcsmoe.heap import trim_heap
from hcsmoe.timing import timed


@torch.no_grad()
def choose_layer_plan(candidates: list, compressed, architecture: Architecture, stats: LayerStats,
                      block: BlockTokens, output_dtype: torch.dtype, refit: RefitOptions | None,
                      router_fit: RouterFitOptions | None, world: World = SINGLE):
    """Per-layer choice between plans: each candidate (plan, layer plan) is applied to a fresh copy of the layer
    (`compressed(plan, layer_plan)`), fitted on 7/8 of the calibration tokens and scored by the relative
    error of its routed output on the other 1/8. Returns the winner's plan, its layer plan (recording every
    candidate's error and its fits) and its fitted copy of the layer, which is the result. The candidates are
    scored after the closed-form fits; only the winner then gets the expert fit (refit.steps), the costly
    part; with refit.choose_fitted every candidate gets it before it is scored (a plan that only the expert fit
    makes better wins then), at the expert fit's cost once per candidate. The winner's closed-form fits are not
    redone on all tokens (that would gain little, 7/8 of them already, and cost a third of the layer's time); its
    expert fit uses all of them (expert_fit_tokens). One compressed copy is held at a time (a layer's memory
    counts in both runners): the candidates are fitted last to first, and the first one's copy (the recipe's
    merge, which wins most layers) is returned if it wins, else None: rebuilding the winner and fitting it
    (fit_compressed_layer) gives the same bits. The heap is trimmed (heap.py) before each candidate is built
    and before the expert fit, as the previous copy's and fits' memory was just freed.
    `world` (torchrun): every rank builds every candidate, rank r fits and scores candidates r, r + N, ...; the
    scores are exchanged and the winner's fitted weights copied from the rank that fitted it."""
    fitting, held = split_tokens(block)
    fitted_first = refit is not None and refit.choose_fitted
    energy = float(held.routed.double().pow(2).sum())
    fitter = lambda position: position % world.size  # the rank that fits and scores a candidate
    trials = {}
    for position in reversed(range(len(candidates))):
        plan, layer_plan = candidates[position]
        trial = copy.deepcopy(layer_plan)
        trim_heap()
        moe = compressed(plan, trial)
        error = None
        if fitter(position) == world.rank:
            fit_compressed_layer(moe, architecture, trial, stats, fitting, output_dtype, refit, router_fit,
                                 with_experts=fitted_first)
            with timed("choice"):
                residual = held.routed.double() - routed_output(moe, architecture, held.inputs)
                error = float(residual.pow(2).sum()) / max(energy, 1e-30)
        kept = moe if position == 0 else None
        trials[position] = (error, trial, kept)
        del moe, kept
    scored = {p: t[:2] for rank in world.gather({p: t[:2] for p, t in trials.items() if t[0] is not None})
              for p, t in rank.items()}
    trials = [(*scored[position], trials[position][2]) for position in range(len(candidates))]
    best = min(range(len(candidates)), key=lambda i: (trials[i][0], i))
    _, chosen, moe = trials[best]
    chosen.details["choice"] = {"held_out_error": {c[0].method: round(t[0], 6) for c, t in zip(candidates, trials)},
                                "chosen": candidates[best][0].method}
    if moe is not None:
        if fitter(best) == world.rank and not fitted_first:
            trim_heap()
            fit_layer_experts(moe, architecture, chosen, expert_fit_tokens(chosen, block, refit), output_dtype,
                              refit)
        if world.size > 1:
            world.copy_from(fitter(best), fitted_tensors(moe))
            if refit is not None and refit.steps:  # the expert fit's report, from the rank that ran it
                chosen.details["refit"] = world.gather(chosen.details.get("refit"))[fitter(best)]
    return candidates[best][0], chosen, moe
