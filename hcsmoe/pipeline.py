"""The pipeline in one call. Every MoE layer goes through the five stages, in this order:

1. calibrate (hcsmoe/calibration): run calibration text through the layer; per-expert statistics.
2. plan (hcsmoe/planners): per layer, which experts form which group with what weights (a pruning plan
   leaves the dropped experts out); plain JSON data.
3. apply (hcsmoe/apply): weight surgery, each group merged into one expert, router rows rebuilt.
4. fit (hcsmoe/fitting): the compressed layer fitted to the original layer's output (router fit,
   down-projection refit, expert fit).
5. save (hcsmoe/checkpoints): an ordinary checkpoint with the plan, written atomically.

A runner (hcsmoe/runners) decides how the stages run: the whole model in memory, one layer at a time from
disk (streaming), or expert-parallel under torchrun; all three write the same bits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from transformers import PreTrainedModel

from hcsmoe.calibration.statistics import Statistics
from hcsmoe.distributed import SINGLE, World
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import Plan
from hcsmoe.recipe import Recipe
from hcsmoe.result import CompressionResult
from hcsmoe.workers import one_thread_kernels

__all__ = ["CompressionResult", "Recipe", "compress"]

# compress()'s keyword names that predate the Recipe, and the Recipe field each one sets.
RECIPE_ALIASES = {"num_experts": "experts", "num_blocks": "blocks"}


def compress(
    model_or_path: PreTrainedModel | str | Path | None = None,
    recipe: Recipe | None = None,
    *,
    tokenizer=None,
    stats: Statistics | None = None,
    plan: Plan | None = None,
    stream_to: str | Path | None = None,
    keep_samples: bool = True,
    offload_dir: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    world: World = SINGLE,
    resume: bool = False,
    **recipe_options,
) -> CompressionResult:
    """Compress an MoE model by `recipe` (a Recipe, or its fields as keywords: `num_experts=16`, `size=0.5`,
    `method="hc-smoe"`, `refit=RefitOptions(steps=30)`, ...; the default recipe if none: half the routed
    parameters, in the shape of experts and neurons that measures best, see hcsmoe/sizing.py).

    `model_or_path` is a checkpoint directory (None: the bundled reference model) or a loaded model, which is
    copied, never modified. Computation runs in float32; the result is cast to the recipe's dtype (default: the
    checkpoint's own). Pass `stats` to skip calibration, `plan` to re-apply a plan (with the fits it records,
    unless the recipe says otherwise).
    `stream_to`: read, compress and write one layer at a time straight into that directory (for models
    larger than memory); the result then holds no model and is already saved. `keep_samples=False` lets a
    streaming run drop each finished layer's per-token samples (its statistics can then not re-fit an lsq router).
    `offload_dir`: keep the calibration's per-token buffers in memory-mapped files there (streaming does
    this by itself, inside its output's temporary directory, when they would take over 1/4 of free memory).
    `world` (streaming only): this process is one rank of a torchrun job (`distributed.join`): expert-parallel.
    `resume` (streaming, one process or torchrun): continue the interrupted streaming run of the same command into
    `stream_to`.
    """
    recipe = with_options(recipe or Recipe(), recipe_options)
    with one_thread_kernels(device):  # the same bits at any thread count (hcsmoe/workers.py)
        return run_recipe(model_or_path, recipe, tokenizer=tokenizer, stats=stats, plan=plan, stream_to=stream_to,
                          keep_samples=keep_samples, offload_dir=offload_dir, overwrite=overwrite, device=device,
                          progress=progress, world=world, resume=resume)


def run_recipe(model_or_path: PreTrainedModel | str | Path | None, recipe: Recipe, *, tokenizer, stats: Statistics | None,
               plan: Plan | None, stream_to: str | Path | None, keep_samples: bool, offload_dir: str | Path | None,
               overwrite: bool, device: str, progress: bool, world: World, resume: bool) -> CompressionResult:
    """compress() once its recipe is whole: choose the shape where the recipe gives a size, then run the runner."""
    sizing = None
    if stream_to is not None and recipe.following(plan).distill is not None:
        raise UserError("--distill-steps fits every MoE layer at once against the original model: both must fit in "
                        "memory in float32; run with --no-stream, or drop --distill-steps")
    if recipe.size is not None and stats is not None:
        raise UserError("--size compresses the model at each shape of its grid from its calibration text: give "
                        "--experts and --width instead of --size with --stats")
    if recipe.size_to_choose(with_plan=plan is not None, with_stats=stats is not None) is not None:
        from hcsmoe.sizing import choose_shape

        recipe, sizing = choose_shape(model_or_path, recipe, tokenizer=tokenizer, device=device, progress=progress,
                                      stream_to=stream_to, world=world)
    recipe = recipe.following(plan).resolved(replanning=stats is not None)
    if recipe.sequential and stats is not None:
        raise UserError("sequential mode calibrates each layer after compressing the ones before it; it cannot "
                        "re-plan from a statistics file: drop --stats or --sequential")
    if world.size > 1 and stream_to is None:
        raise UserError("a torchrun job compresses with --stream (each rank reads its share of the experts from disk)")
    if stream_to is not None:
        from hcsmoe.runners.streaming import compress_streaming

        if isinstance(model_or_path, PreTrainedModel):
            raise UserError("streaming reads a checkpoint directory; pass its path instead of a loaded model")
        return compress_streaming(model_or_path, stream_to, recipe, tokenizer=tokenizer, stats=stats, plan=plan,
                                  keep_samples=keep_samples, offload_dir=offload_dir, overwrite=overwrite,
                                  device=device, progress=progress, world=world, resume=resume, size=sizing)
    from hcsmoe.runners.in_memory import compress_in_memory

    return compress_in_memory(model_or_path, recipe, tokenizer=tokenizer, stats=stats, plan=plan,
                              offload_dir=offload_dir, device=device, progress=progress, size=sizing)


def with_options(recipe: Recipe, options: dict) -> Recipe:
    """The recipe with some fields replaced, given by their Recipe names or by compress()'s older keywords."""
    fields = {RECIPE_ALIASES.get(name, name): value for name, value in options.items()}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Recipe)})
    if unknown:
        raise TypeError(f"compress() got unexpected keyword arguments: {', '.join(unknown)}")
    return dataclasses.replace(recipe, **fields) if fields else recipe
