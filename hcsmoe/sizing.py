"""A size the user asks for (--size F): keep a fraction F of the routed experts' parameters, as fewer experts,
narrower experts or both, with one shape (K experts of I2 neurons) for every layer as configs require.

Each shape of a small grid (K from F*E to E, I2 = F*E*I/K) is compressed with the closed-form recipe (--fast)
on a share of the calibration text; the shape whose fitted layers reproduce the original layers best on the
per-layer choice's held-out tokens (mean over MoE layers) is then compressed with the whole recipe. The plan
records the grid, each shape's error and the choice. Router rows (K x H) are not counted: under 1% of an
expert's parameters at every supported shape.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

from transformers import PreTrainedModel

from hcsmoe.apply.narrow import WIDTH_MULTIPLE
from hcsmoe.calibration.text import CALIBRATION_TOKENS
from hcsmoe.checkpoints.architectures import architecture_for, expert_count, top_k
from hcsmoe.checkpoints.loading import load_config, model_dir
from hcsmoe.errors import UserError
from hcsmoe.recipe import Recipe

GRID_POINTS = 5  # shapes tried: K = F*E, ..., E in equal steps
PROBE_TOKENS = CALIBRATION_TOKENS // 4  # calibration tokens each probe compresses with


def shape_grid(num_experts: int, width: int, fraction: float, top_k: int = 1,
               multiple: int = WIDTH_MULTIPLE) -> list[tuple[int, int]]:
    """(K, I2) pairs holding at most `fraction` of E x I neurons: K from the fewest experts that keep every
    neuron to all E experts (at least top_k), each with the most neurons the budget leaves in multiples of
    `multiple` (as --width rounds); of two shapes with one width the one with more experts stays, and a count
    no multiple fits is left out."""
    budget = fraction * num_experts * width
    fewest = max(math.ceil(fraction * num_experts - 1e-9), top_k, 1)
    counts = sorted({round(fewest + j * (num_experts - fewest) / (GRID_POINTS - 1)) for j in range(GRID_POINTS)})
    by_width: dict[int, int] = {}
    for k in counts:
        neurons = min(width, int(budget // k + 1e-9))
        neurons = neurons if neurons == width else neurons // multiple * multiple
        if neurons >= 1:
            by_width[neurons] = k  # counts ascend: the last one for a width has the most experts
    return sorted((k, neurons) for neurons, k in by_width.items())


def config_of(model_or_path: PreTrainedModel | str | Path | None):
    return model_or_path.config if isinstance(model_or_path, PreTrainedModel) else load_config(model_dir(model_or_path))


def probe_blocks(recipe: Recipe, config) -> int:
    """Calibration blocks of a probe: PROBE_TOKENS' worth at the recipe's block length, at most the recipe's."""
    length = max(min(recipe.block_size, int(getattr(config, "max_position_embeddings", recipe.block_size))), 1)
    return min(recipe.blocks or CALIBRATION_TOKENS // length, -(-PROBE_TOKENS // length))


def model_shape(config) -> tuple[int, int, int]:
    """E (routed experts per layer), I (their neurons) and the routing's top-k, from the config."""
    architecture = architecture_for(config)
    if architecture.width_key is None:
        raise UserError(f"--size narrows experts, and {architecture.name}'s shared experts take their width from the "
                        "config key of its routed experts; give --experts instead")
    return (expert_count(config, architecture), int(getattr(config, architecture.width_key)),
            top_k(config, architecture))


def held_out_error(plan) -> float:
    """Mean over MoE layers of the fitted layer's held-out error (the per-layer choice's, chosen candidate)."""
    errors = [layer.details["choice"]["held_out_error"][layer.details["choice"]["chosen"]] for layer in plan.layers]
    return sum(errors) / len(errors)


def choose_shape(model_or_path, recipe: Recipe, *, tokenizer=None, device: str = "cpu",
                 progress: bool = True) -> tuple[Recipe, dict]:
    """The recipe with --size turned into --experts and --width, and the record of how (for the plan)."""
    from hcsmoe.runners.in_memory import compress_in_memory

    if recipe.method is not None:
        raise UserError("--size compares shapes by the default recipe's per-layer choice; drop --method (or give "
                        "--experts and --width)")
    start, config = time.perf_counter(), config_of(model_or_path)
    num_experts, width, routed = model_shape(config)
    grid, blocks = shape_grid(num_experts, width, recipe.size, routed), probe_blocks(recipe, config)
    tried = []
    for k, neurons in grid:
        probe = dataclasses.replace(recipe, size=None, experts=k, width=neurons if neurons < width else None,
                                    fast=True, refit=None, blocks=blocks).resolved()
        result = compress_in_memory(model_or_path, probe, tokenizer=tokenizer, device=device, progress=False)
        tried.append({"experts": k, "width": neurons, "held_out_error": round(held_out_error(result.plan), 6)})
        if progress:
            print(f"hcsmoe: --size {recipe.size}: {k} experts of {neurons} neurons, held-out error "
                  f"{tried[-1]['held_out_error']:.4f}", file=sys.stderr)
    best = min(tried, key=lambda t: (t["held_out_error"], -t["width"]))
    chosen = dataclasses.replace(recipe, size=None, experts=best["experts"], width=best["width"] if best["width"] < width else None)
    record = {"fraction": recipe.size, "experts": num_experts, "neurons": width, "probe_blocks": blocks,
              "probe_recipe": "fast", "grid": tried, "chosen": {"experts": best["experts"], "width": best["width"]},
              "seconds": round(time.perf_counter() - start, 3)}
    return chosen, record
