"""The in-memory runner: the whole model loaded, calibrated layer by layer, each MoE layer planned, merged and
fitted as soon as its calibration is done (so that, in sequential mode, the next layer sees it compressed)."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hcsmoe.apply.layer import apply_layer, apply_plan, install, layer_copy
from hcsmoe.apply.sparsify import input_norms, sparsify_layers
from hcsmoe.calibration.statistics import Statistics
from hcsmoe.calibration.text import calibration_blocks, model_context
from hcsmoe.checkpoints.architectures import (
    Architecture,
    MoELayer,
    architecture_for,
    moe_layers,
    set_expert_count,
    set_expert_width,
    top_k,
)
from hcsmoe.checkpoints.check import check_checkpoint
from hcsmoe.checkpoints.formats import Plain, drop_quantization, format_of
from hcsmoe.checkpoints.loading import load_config, load_model, load_tokenizer, model_dir, parse_dtype, skeleton
from hcsmoe.checkpoints.shards import INDEX_NAME
from hcsmoe.errors import UserError
from hcsmoe.fitting.choice import choose_layer_plan
from hcsmoe.fitting.distill import distill
from hcsmoe.fitting.stage import fit_compressed_layer
from hcsmoe.heap import trim_heap
from hcsmoe.planners.plan import LayerPlan, Plan
from hcsmoe.planners.registry import PerLayerChoice, plan_model, plan_of, plan_with_layers
from hcsmoe.recipe import Recipe
from hcsmoe.result import CompressionResult
from hcsmoe.runners.layerwise import calibrate_model
from hcsmoe.runners.progress import LayerEstimate
from hcsmoe.runners.setup import Job, held_dtype, normalizes_top_k, output_dtype_for, prepare, record_size
from hcsmoe.timing import timed


def compress_in_memory(model_or_path: PreTrainedModel | str | Path | None, recipe: Recipe, *, tokenizer=None,
                       stats: Statistics | None = None, plan: Plan | None = None, offload_dir: str | Path | None = None,
                       device: str = "cpu", progress: bool = True, size: dict | None = None) -> CompressionResult:
    """compress() with the whole model in memory (`recipe` resolved; `size`: --size's record of the shape's choice)."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    fmt = Plain()
    if isinstance(model_or_path, PreTrainedModel):
        source = None
        output_dtype = parse_dtype(recipe.dtype) if recipe.dtype else next(model_or_path.parameters()).dtype
        model = copy.deepcopy(model_or_path).float().eval()
        if tokenizer is None and stats is None:
            raise UserError("pass tokenizer= with a model object (needed to tokenize calibration text)")
    else:
        source = model_dir(model_or_path)
        config = load_config(source)
        if any(source.glob("*.safetensors")) or (source / INDEX_NAME).is_file():  # (.bin: transformers checks it)
            check_checkpoint(source, skeleton(config))
        fmt = format_of(config)
        output_dtype = output_dtype_for(fmt, recipe.dtype, config)
        model = load_model(source, held_dtype(fmt, output_dtype, config), device)
        tokenizer = tokenizer or load_tokenizer(source)
    layers = moe_layers(model, architecture_for(model.config))
    job = prepare(model.config, layers, recipe, plan, stats, output_dtype, fmt, layers[0].num_experts)
    timings["load"] = time.perf_counter() - start

    mark = time.perf_counter()
    blocks = None  # the calibration's token blocks, for the end-to-end stage too
    if job.needs_calibration(stats):
        blocks = model_blocks(model, tokenizer, recipe.calibration, recipe.blocks, recipe.block_size, recipe.seed)
        layer_plans: list[LayerPlan] = []
        norms: dict[int, list] = {}  # --sparsity: each fitted layer's input norms (Wanda)
        after_layer = compress_layer_in_place(job, layer_plans, LayerEstimate(len(layers), progress), norms)
        stats = calibration_statistics(model, job.architecture, layers, blocks, recipe.calibration,
                                       batch_size=recipe.batch_size, output_samples=job.output_samples(),
                                       with_weight_gram=job.with_weight_gram, after_layer=after_layer,
                                       offload_dir=Path(offload_dir) if offload_dir else None, progress=progress,
                                       corrective=recipe.sequential == "corrective")
        stats.info["sequential"] = recipe.sequential
        plan = plan_with_layers(plan, job.planner, recipe, layer_plans, job.width)
        if recipe.sparsity is not None:
            plan.sparsity = sparsify_layers(layers, job.architecture, norms, recipe.sparsity)
        set_expert_count(model.config, job.architecture, job.kept)
        timings["calibrate+compress"] = time.perf_counter() - mark
    else:
        if plan is None:
            plan = plan_model(stats.layers, job.kept, job.top_k, job.planner, recipe.router, job.width)
            plan.recipe = recipe.to_dict()
        timings["plan"] = time.perf_counter() - mark
        mark = time.perf_counter()
        apply_plan(model, job.architecture, layers, plan, stats.layers if stats else None, progress=progress)
        timings["apply"] = time.perf_counter() - mark
    if recipe.distill is not None:
        mark = time.perf_counter()
        plan.distill = distilled(model, model_or_path, source, job.architecture, tokenizer, recipe, device, progress,
                                 blocks)
        timings["distill"] = time.perf_counter() - mark
    if job.width is not None:
        set_expert_width(model.config, job.architecture, job.width)
    if output_dtype is not None:
        model.to(output_dtype)
        drop_quantization(model.config)
    record_size(plan, timings, size)
    info = job.info(source, plan, timings)
    return CompressionResult(model, tokenizer, plan, stats, job.architecture, source, info,
                             keep_format=output_dtype is None)


def distilled(model: PreTrainedModel, original: PreTrainedModel | str | Path | None, source: Path | None,
              architecture: Architecture, tokenizer, recipe: Recipe, device: str, progress: bool,
              blocks: torch.Tensor | None) -> dict:
    """The end-to-end stage (fitting/distill.py) on the compressed `model`, against the original: the model
    object given (in float32), or the checkpoint read again; on the calibration's `blocks` (None when the run
    was given its statistics: the recipe's blocks, `self` text sampled from that original). Returns what the
    plan records."""
    if blocks is None and tokenizer is None:
        raise UserError("--distill-steps tokenizes the calibration text: pass tokenizer= with the statistics")
    if isinstance(original, PreTrainedModel):
        usable = next(original.parameters()).dtype == torch.float32 and not original.training
        teacher = original if usable else copy.deepcopy(original).float().eval()  # the user's model stays as it is
    else:
        teacher = load_model(source, "float32", device)
    if blocks is None:
        blocks = model_blocks(teacher, tokenizer, recipe.calibration, recipe.blocks, recipe.block_size, recipe.seed)
    model.float()  # held in the saved dtype where that is narrower; cast back to it after the stage
    report = distill(model, teacher, architecture, blocks, recipe.distill, recipe.seed, progress)
    if "fallback" in report:
        print(f"hcsmoe: the end-to-end stage did not lower the divergence on held-out calibration blocks "
              f"({report['kl_before']:.6g}) at any of its checks: the compressed model keeps the layer-local fits' "
              f"weights (recorded in the plan; a smaller --distill-lr may help)", file=sys.stderr)
    return {"options": recipe.distill.to_dict(), **report}


def model_blocks(model: PreTrainedModel, tokenizer, source: str, num_blocks: int | None, block_size: int,
                 seed: int = 0) -> torch.Tensor:
    """Calibration blocks of `source` text for `model` (blocks no longer than its context; a `self` part sampled
    from it, `seed` seeding that sampling)."""
    return calibration_blocks(tokenizer, source, num_blocks, block_size, model_context(model.config, block_size),
                              model, seed)


def calibration_statistics(
    model: PreTrainedModel,
    architecture: Architecture,
    layers: list[MoELayer],
    blocks: torch.Tensor,
    source: str,
    *,
    batch_size: int = 4,
    output_samples: int = 0,
    with_weight_gram: bool = False,
    after_layer=None,
    offload_dir: Path | None = None,
    progress: bool = True,
    corrective: bool = False,
) -> Statistics:
    """Stage 1 over the whole model: calibrate every MoE layer on `blocks` (model_blocks of `source` text),
    recording how the statistics were made. `after_layer` runs stages 2-4 on each layer."""
    layer_stats = calibrate_model(model, architecture, blocks, batch_size=batch_size, output_samples=output_samples,
                                  with_weight_gram=with_weight_gram, after_layer=after_layer,
                                  offload_dir=offload_dir, progress=progress, corrective=corrective)
    info = {"calibration": source, "blocks": list(blocks.shape), "tokens": int(blocks.numel()),
            "norm_topk_prob": normalizes_top_k(layers)}
    return Statistics(layer_stats, top_k(model.config, architecture), info)


def compress_layer_in_place(job: Job, layer_plans: list[LayerPlan], estimate: LayerEstimate,
                            norms: dict[int, list]):
    """Stages 2-4 of one layer, run as soon as it is calibrated: plan it (or take the given plan's layer),
    apply the plan, then fit the compressed layer to the original's output. The returned callback says
    whether the next layers see the compressed layer (sequential mode) or the original. After the first
    layer, `estimate` tells the user what the whole run will take. With --sparsity, the fitted layer's input
    norms go to `norms` (OWL-Wanda zeroes weights once every layer is done)."""
    recipe, architecture, given = job.recipe, job.architecture, job.plan
    given_layers = {lp.layer: lp for lp in given.layers} if given is not None else {}
    output_dtype = job.output_dtype or torch.float32

    def compressed_copy(moe: MoELayer, stats):
        def compressed(plan: Plan, layer_plan: LayerPlan) -> MoELayer:
            trial = layer_copy(moe)
            apply_layer(trial, architecture, layer_plan, plan, stats, job.top_k)
            return trial
        return compressed

    def after_layer(moe: MoELayer, stats, block) -> bool:
        if isinstance(job.planner, PerLayerChoice) and given is None:
            candidates = job.planner.candidate_plans(stats, job.kept, recipe.router, job.width)
            winner, layer_plan, chosen = choose_layer_plan(candidates, compressed_copy(moe, stats), architecture, stats,
                                                           block, output_dtype, recipe.refit, recipe.router_fit)
            if chosen is None:  # not the copy the choice kept: built again and fitted, the same bits
                trim_heap()
                chosen = compressed_copy(moe, stats)(winner, layer_plan)
                fit_compressed_layer(chosen, architecture, layer_plan, stats, block, output_dtype, recipe.refit,
                                     recipe.router_fit)
            install(moe, chosen)
        else:
            if given is not None:
                layer_plan_of, layer_plan = given, copy.deepcopy(given_layers[moe.index])
            else:
                with timed("plan"):
                    layer_plan = job.planner.plan_layer(stats, job.kept)
                layer_plan_of = plan_of(job.planner, recipe.router, [layer_plan], job.width)
            apply_layer(moe, architecture, layer_plan, layer_plan_of, stats, job.top_k)
            fit_compressed_layer(moe, architecture, layer_plan, stats, block, output_dtype,
                                 recipe.refit, recipe.router_fit)
        layer_plans.append(layer_plan)
        if recipe.sparsity is not None:
            norms[moe.index] = input_norms(moe, architecture, block)
        estimate.layer_done()
        return bool(recipe.sequential)

    return after_layer
