"""A size the user asks for (--size F): keep a fraction F of the routed experts' parameters, as fewer experts,
narrower experts or both, with one shape (K experts of I2 neurons) for every layer as configs require.

Each shape of a small grid (K from F*E to E, I2 = F*E*I/K) is compressed with the closed-form recipe (--fast)
on a share of the calibration text; the shape whose fitted layers reproduce the original layers best on the
per-layer choice's held-out tokens (mean over MoE layers) is then compressed with the whole recipe. The plan
records the grid, each shape's error and the choice. Router rows (K x H) are not counted: under 1% of an
expert's parameters at every supported shape. The default recipe is --size 0.5 (recipe.DEFAULT_SIZE) unless
--experts, --ratio, --width or a method set the shape. DeepSeek's shared experts are n_shared_experts times the
routed width wide, so its grid keeps the widths that divide theirs (the count is raised to match). Where the
experts cannot be narrowed at all (Llama 4's shared expert reads the routed experts' width key) only the count
changes: F*E experts, no probes.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from pathlib import Path

from transformers import PreTrainedModel

from hcsmoe.apply.narrow import MXFP4_WIDTH_MULTIPLE, WIDTH_MULTIPLE
from hcsmoe.calibration.text import CALIBRATION_TOKENS, model_context
from hcsmoe.checkpoints.architectures import (
    architecture_for,
    expert_count,
    top_k,
    width_fits,
)
from hcsmoe.checkpoints.formats import Mxfp4, format_of
from hcsmoe.checkpoints.loading import load_config, model_dir
from hcsmoe.distributed import SINGLE, World
from hcsmoe.errors import UserError
from hcsmoe.recipe import Recipe

GRID_POINTS = 5  # shapes tried: K = F*E, ..., E in equal steps
PROBE_TOKENS = 16384  # calibration tokens each probe compresses with (an eighth of the default's; the quarter
# of 65,536 it was measured at, before the default doubled)


def shape_grid(num_experts: int, width: int, fraction: float, top_k: int = 1,
               multiple: int = WIDTH_MULTIPLE) -> list[tuple[int, int]]:
    """(K, I2) pairs holding at most `fraction` of E x I neurons: K from the fewest experts that keep every
    neuron to all E experts (at least top_k), each with the most neurons the budget leaves in multiples of
    `multiple` (as --width rounds); of two shapes with one width the one with more experts stays, and a count
    no multiple fits is left out."""
    budget, fewest = fraction * num_experts * width, fewest_experts(num_experts, fraction, top_k)
    counts = sorted({round(fewest + j * (num_experts - fewest) / (GRID_POINTS - 1)) for j in range(GRID_POINTS)})
    by_width: dict[int, int] = {}
    for k in counts:
        neurons = min(width, int(budget // k + 1e-9))
        neurons = neurons if neurons == width else neurons // multiple * multiple
        if neurons >= 1:
            by_width[neurons] = k  # counts ascend: the last one for a width has the most experts
    return sorted((k, neurons) for neurons, k in by_width.items())


def fewest_experts(num_experts: int, fraction: float, top_k: int) -> int:
    """The fewest whole experts holding `fraction` of the layer (at least the routing's top-k)."""
    return max(math.ceil(fraction * num_experts - 1e-9), top_k, 1)


def config_of(model_or_path: PreTrainedModel | str | Path | None):
    return model_or_path.config if isinstance(model_or_path, PreTrainedModel) else load_config(model_dir(model_or_path))


def probe_blocks(recipe: Recipe, config) -> int:
    """Calibration blocks of a probe: PROBE_TOKENS' worth at the recipe's block length, at most the recipe's."""
    length = max(min(recipe.block_size, model_context(config, recipe.block_size)), 1)
    return min(recipe.blocks or CALIBRATION_TOKENS // length, -(-PROBE_TOKENS // length))


def model_shape(config) -> tuple[int, int | None, int]:
    """E (routed experts per layer), I (their neurons; None where the experts cannot be narrowed: an
    architecture whose shared experts take their width from the routed experts' key alone) and the routing's top-k."""
    architecture = architecture_for(config)
    width = int(getattr(config, architecture.width_key)) if architecture.width_key else None
    return expert_count(config, architecture), width, top_k(config, architecture)


def config_shapes(config, recipe: Recipe, fraction: float) -> list[tuple[int, int]]:
    """shape_grid's shapes whose width the config can hold (DeepSeek: widths that divide its shared experts')."""
    num_experts, width, routed = model_shape(config)
    architecture = architecture_for(config)
    return [(k, neurons) for k, neurons in shape_grid(num_experts, width, fraction, routed, width_multiple(config, recipe))
            if width_fits(config, architecture, neurons)]


def width_multiple(config, recipe: Recipe) -> int:
    """What widths must be multiples of: as --width rounds (32 when the output stays MXFP4)."""
    return MXFP4_WIDTH_MULTIPLE if isinstance(format_of(config), Mxfp4) and recipe.dtype is None else WIDTH_MULTIPLE


def held_out_error(plan) -> float:
    """Mean over MoE layers of the fitted layer's held-out error (the per-layer choice's, chosen candidate)."""
    errors = [layer.details["choice"]["held_out_error"][layer.details["choice"]["chosen"]] for layer in plan.layers]
    return sum(errors) / len(errors)


def choose_shape(model_or_path, recipe: Recipe, *, tokenizer=None, device: str = "cpu", progress: bool = True,
                 stream_to: Path | None = None, world: World = SINGLE) -> tuple[Recipe, dict]:
    """The recipe with --size turned into --experts and --width, and the record of how (for the plan).
    `stream_to` (the run's output): the probes stream the checkpoint too, each into a scratch directory beside
    it that is removed after its plan is read (under torchrun, expert-parallel as the run itself)."""
    if recipe.method is not None:
        raise UserError("--size compares shapes by the default recipe's per-layer choice; drop --method (or give "
                        "--experts and --width)")
    start, config, fraction = time.perf_counter(), config_of(model_or_path), recipe.size_to_choose()
    num_experts, width, routed = model_shape(config)
    if width is None:  # e.g. Llama 4: only the count can change
        if recipe.size is not None and progress and world.leader:
            print(f"hcsmoe: --size {fraction}: {architecture_for(config).name}'s shared experts take their width "
                  "from the routed experts' config key, so only the number of experts changes", file=sys.stderr)
        grid = [(fewest_experts(num_experts, fraction, routed), None)]
    else:
        grid = config_shapes(config, recipe, fraction)
    blocks, tried = probe_blocks(recipe, config), []
    for k, neurons in grid if len(grid) > 1 else []:
        probe = dataclasses.replace(recipe, size=None, experts=k, width=neurons if neurons < width else None,
                                    fast=True, refit=None, blocks=blocks, distill=None).resolved()
        began = time.perf_counter()
        plan = probe_plan(model_or_path, probe, tokenizer, device, stream_to, world)
        tried.append({"experts": k, "width": neurons, "held_out_error": round(held_out_error(plan), 6)})
        if progress and world.leader:
            print(f"hcsmoe: --size {fraction}: {k} experts of {neurons} neurons, held-out error "
                  f"{tried[-1]['held_out_error']:.4f} ({time.perf_counter() - began:.0f} s; shape {len(tried)} of "
                  f"{len(grid)})", file=sys.stderr)
    tried = world.from_leader(tried)  # one choice for every rank
    best = min(tried, key=lambda t: (t["held_out_error"], -t["width"])) if tried else {"experts": grid[0][0],
                                                                                      "width": grid[0][1]}
    narrower = best["width"] is not None and best["width"] < width
    chosen = dataclasses.replace(recipe, size=None, experts=best["experts"], width=best["width"] if narrower else None)
    record = {"fraction": fraction, "experts": num_experts, "neurons": width, "probe_blocks": blocks,
              "probe_recipe": "fast", "grid": tried, "chosen": {"experts": best["experts"], "width": best["width"]},
              "seconds": round(time.perf_counter() - start, 3)}
    return chosen, record


def probe_plan(model_or_path, probe: Recipe, tokenizer, device: str, stream_to: Path | None, world: World):
    """The plan (with each layer's held-out errors) of one shape, compressed in memory or streamed."""
    if stream_to is None:
        from hcsmoe.runners.in_memory import compress_in_memory

        return compress_in_memory(model_or_path, probe, tokenizer=tokenizer, device=device, progress=False).plan
    from hcsmoe.runners.streaming import compress_streaming

    out = Path(stream_to).resolve()
    scratch = out.parent / f".{out.name}.hcsmoe-size-probe"  # one name: a killed probe's leftovers go next time
    try:
        plan = compress_streaming(model_or_path, scratch, probe, tokenizer=tokenizer, overwrite=True, device=device,
                                  progress=False, world=world, journaled_run=False).plan
    except BaseException:
        if world.leader:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    world.barrier()  # every rank has read what it needs before the scratch goes
    if world.leader:
        shutil.rmtree(scratch, ignore_errors=True)
    return plan
