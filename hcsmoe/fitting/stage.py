"""Stage 4 on one compressed layer, in order: router fit, rounding to the saved dtype, down-projection
refit, expert fit. Each fit is recorded in the layer's plan.
"""

from __future__ import annotations

import sys

import torch

from hcsmoe.calibration.statistics import BlockTokens, LayerStats
from hcsmoe.checkpoints.architectures import Architecture, MoELayer
from hcsmoe.fitting.expert_fit import fit_experts
from hcsmoe.fitting.refit import RefitOptions, refit_layer
from hcsmoe.fitting.router_fit import RouterFitOptions, fit_router
from hcsmoe.planners.plan import LayerPlan


def split_tokens(block: BlockTokens, held_out: float = 1 / 8) -> tuple[BlockTokens, BlockTokens]:
    """(fitting part, held-out part): the last `held_out` of the tokens (the last calibration blocks) held out."""
    cut = block.inputs.shape[0] - max(1, int(block.inputs.shape[0] * held_out))
    part = lambda piece: BlockTokens(*(None if t is None else t[piece] for t in
                                       (block.inputs, block.routed, block.scores, block.rest)))
    return part(slice(0, cut)), part(slice(cut, None))


def fitting_tokens(layer_plan: LayerPlan, block: BlockTokens | None) -> BlockTokens | None:
    """The tokens a layer plan's closed-form fits use: a plan made by the per-layer choice was fitted on its
    fitting part, so re-applying it fits on the same tokens and gives the same weights."""
    if block is not None and "choice" in layer_plan.details:
        return split_tokens(block)[0]
    return block


def expert_fit_tokens(layer_plan: LayerPlan, block: BlockTokens | None, refit: RefitOptions | None) -> BlockTokens | None:
    """The tokens the expert fit uses: all of them, also after the per-layer choice. The choice scores the
    candidates on the eighth their closed-form fits did not see; the expert fit, run on the winner alone, then
    fits on that eighth too (held-out train text, all three bundled models: docs/choosing-the-default.md).
    Where the choice scored candidates after their expert fits (refit.choose_fitted), those fits are the
    fitting part's, as when the plan was made."""
    if refit is not None and refit.choose_fitted:
        return fitting_tokens(layer_plan, block)
    return block


def fitted_tensors(moe: MoELayer) -> list[torch.Tensor]:
    """Every tensor the fitting stages may change: the compressed layer's experts and router."""
    return [tensor for module in (moe.experts, moe.router)
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]]


def round_layer(moe: MoELayer, dtype: torch.dtype) -> None:
    """Round the compressed layer's expert and router weights to the dtype they will be saved in, so the
    fit sees the weights the saved model will run (the values stay float32, exactly representable)."""
    for module in (moe.experts, moe.router):
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor.is_floating_point():
                tensor.data.copy_(tensor.data.to(dtype).to(tensor.dtype))


def fit_compressed_layer(moe: MoELayer, architecture: Architecture, layer_plan: LayerPlan, stats: LayerStats,
                         block: BlockTokens | None, output_dtype: torch.dtype, refit: RefitOptions | None,
                         router_fit: RouterFitOptions | None, with_experts: bool = True) -> None:
    """The fitting stage of one compressed layer on its calibration tokens `block`: fit its router to the
    original routing mass, round it to the saved dtype, refit its down projections to the original layer's
    routed output (with the final router), then (refit.steps, unless `with_experts` is False) gate/up and down
    together, and record each fit in the layer's plan (tokens: fitting_tokens, expert_fit_tokens). The layer
    then holds exactly the values that will be saved (what sequential calibration runs next). A plan that
    keeps every expert unmerged and as wide is only rounded, so K = E still reproduces the model bit for bit."""
    closed_form = fitting_tokens(layer_plan, block)
    identity = (layer_plan.dropped == [] and all(len(g.members) == 1 for g in layer_plan.groups)
                and "width" not in layer_plan.details)
    with torch.no_grad():
        if router_fit is not None and not identity:
            layer_plan.details["router_fit"] = reported(layer_plan, "router fit",
                                                        fit_router(moe, architecture, layer_plan, stats, closed_form,
                                                                   router_fit))
        round_layer(moe, output_dtype)
        if refit is not None and not identity:
            layer_plan.details["refit"] = reported(layer_plan, "refit",
                                                   refit_layer(moe, architecture, closed_form, refit, output_dtype))
            round_layer(moe, output_dtype)
            if with_experts:
                fit_layer_experts(moe, architecture, layer_plan, expert_fit_tokens(layer_plan, block, refit),
                                  output_dtype, refit)


def fit_layer_experts(moe: MoELayer, architecture: Architecture, layer_plan: LayerPlan, block: BlockTokens,
                      output_dtype: torch.dtype, refit: RefitOptions | None) -> None:
    """The expert fit (expert_fit.py) of a refitted layer, when refit.steps asks for one; rounded to the saved dtype."""
    if refit is not None and refit.steps and "refit" in layer_plan.details:
        layer_plan.details["refit"]["experts"] = reported(layer_plan, "expert fit", fit_experts(
            moe, architecture, block, refit.steps, refit.step_tokens, refit.whiten, refit.anchor, round(refit.memory * 2**30)))
        round_layer(moe, output_dtype)


def reported(layer_plan: LayerPlan, fit: str, report: dict) -> dict:
    """A fit's report, said on stderr in one line when the fit fell back to the weights before it (it gave
    non-finite values): the run goes on, that layer a little less well fitted, and the plan records it."""
    if "fallback" in report:
        print(f"hcsmoe: MoE layer {layer_plan.layer}: the {fit} gave {report['fallback']} (recorded in the plan)",
              file=sys.stderr)
    return report
