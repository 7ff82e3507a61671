"""Levers measured beside the default and left out of it: held-out train text (chooses) with validation slices
beside it, as benchmarks/choices.py, at 25% and 50% of the experts removed.

- The opt-in end-to-end stage (--distill-steps, hcsmoe/fitting/distill.py), at two step sizes and step counts.

- The router fitted to the layer's output: after the expert fit, each layer's router rows are fitted (L-BFGS,
  ROUTER_STEPS steps) to the same layer-local error the expert fit minimises, the gates a differentiable
  function of the rows with each token's top-k set held as the fitted router chose it. (The router fit of
  the default matches routing mass, before the refit; this one sees what the fitted experts now compute.)
- The calibration text: twice 65,536 tokens won every row here and became the default (131,072); the row
  with half the default's keeps the comparison (rows measured before the change are labelled with twice the
  then default's).

    python -m benchmarks.levers [--model qwen2-moe|deepseek-v3] [--threads N] [--only REGEX] [--size F [F ...]]
    # writes benchmarks/results/levers-<model>.{md,json} (with --size: levers-size-<model>, rows at those shares
    # of the routed parameters, the default's shapes); --only: the default and the rows whose label matches,
    # the others kept from the last run's JSON
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager

import torch

import hcsmoe.fitting.choice as choice
import hcsmoe.fitting.stage as stage
from benchmarks.choices import RESULTS, bundled_model, expert_counts, kept_rows, measure, write
from hcsmoe.calibration.statistics import expert_slices, routed
from hcsmoe.calibration.text import CALIBRATION_TOKENS, model_context
from hcsmoe.fitting.distill import DistillOptions
from hcsmoe.fitting.expert_fit import expert_output
from hcsmoe.recipe import Recipe

REPORT = "levers"
ROUTER_STEPS = 30
DEFAULT = "**default**"
ROUTER = f"default + router rows fitted to the layer's output after the expert fit ({ROUTER_STEPS} L-BFGS steps)"
TOKENS = f"default, {CALIBRATION_TOKENS // 2:,} calibration tokens (half the default's: the default before it doubled)"
STAGE = "default + end-to-end stage (--distill-steps {steps}{lr})"
STAGES = [DistillOptions(steps=200), DistillOptions(steps=200, lr=3e-5)]


def stage_label(stage: DistillOptions) -> str:
    return STAGE.format(steps=stage.steps, lr="" if stage.lr == DistillOptions.lr else f" --distill-lr {stage.lr:g}")


def gates(config, logits: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The bundled families' gate weights on the chosen experts `indices` from router logits: DeepSeek-V3's
    normalised sigmoid scores times its scaling factor, else the softmax over the chosen experts
    (norm_topk_prob) or over all of them."""
    if config.model_type == "deepseek_v3":
        scores = torch.sigmoid(logits).gather(1, indices)
        if config.norm_topk_prob:
            scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        return scores * config.routed_scaling_factor
    if getattr(config, "norm_topk_prob", False):
        return torch.softmax(logits.gather(1, indices), dim=-1)
    return torch.softmax(logits, dim=-1).gather(1, indices)


def fit_router_to_output(moe, architecture, config, block) -> None:
    """The router rows that minimise the layer's routed-output error with its experts held: per token the
    error is a quadratic in its k gates (Gram of the chosen experts' outputs), so each evaluation is cheap."""
    x, y = block.inputs.float(), block.routed.double()
    indices = routed(moe, architecture, x).indices
    outputs = torch.zeros(*indices.shape, y.shape[1], dtype=torch.float64)
    for expert in range(moe.experts.down_proj.shape[0]):
        token, slot = (indices == expert).nonzero(as_tuple=True)
        if token.numel():
            own = {name: tensor.float() for name, tensor in expert_slices(moe.experts, expert).items()}
            outputs[token, slot] = expert_output(moe.experts, architecture, own, x[token], torch.ones(token.numel())).double()
    gram, cross = outputs @ outputs.transpose(1, 2), (outputs @ y.unsqueeze(-1)).squeeze(-1)
    energy, xd = float(y.pow(2).sum()), x.double()
    rows = moe.router.weight.detach().double().clone().requires_grad_(True)

    def error() -> torch.Tensor:
        g = gates(config, xd @ rows.T, indices)
        return (((g.unsqueeze(1) @ gram).squeeze(1) * g).sum() - 2 * (g * cross).sum() + energy) / energy

    optimizer = torch.optim.LBFGS([rows], max_iter=ROUTER_STEPS, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = error()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(closure)
    moe.router.weight.data.copy_(rows.detach().to(moe.router.weight.dtype))


@contextmanager
def router_fitted_to_output(config):
    """The default with fit_router_to_output after each layer's expert fit (then rounded to the saved dtype)."""
    kept = stage.fit_layer_experts

    def fit(moe, architecture, layer_plan, block, output_dtype, refit):
        kept(moe, architecture, layer_plan, block, output_dtype, refit)
        if refit is not None and refit.steps and "refit" in layer_plan.details:
            with torch.no_grad():
                fit_router_to_output(moe, architecture, config, block)
            stage.round_layer(moe, output_dtype)

    stage.fit_layer_experts = choice.fit_layer_experts = fit
    try:
        yield
    finally:
        stage.fit_layer_experts = choice.fit_layer_experts = kept


def main() -> None:
    start = time.perf_counter()
    name, tokenizer, original, only, args = bundled_model(__doc__, with_only=True, arguments=size_option)
    context = min(Recipe.block_size, model_context(original.config, Recipe.block_size))
    half = {"num_blocks": -(-CALIBRATION_TOKENS // 2 // context)}
    candidates = [(DEFAULT, {})] + [(stage_label(stage), {"distill": stage}) for stage in STAGES] + [(TOKENS, half)]
    chosen = lambda label: label == DEFAULT or only is None or re.search(only, label)
    shapes = [(f"--size {f:g}", {"size": f}) for f in args.size] if args.size else expert_counts(original.config)
    report = REPORT + ("-size" if args.size else "")
    saved = only is not None and (RESULTS / f"{report}-{name}.json").exists()
    kept = {key: row for key, row in kept_rows(name, only, report).items() if key[1] != DEFAULT} if saved else {}
    rows, base = measure(original, tokenizer, [c for c in candidates if chosen(c[0])], {}, shapes)
    if chosen(ROUTER):
        with router_fitted_to_output(original.config):
            rows += measure(original, tokenizer, [(ROUTER, {})], {}, shapes)[0]
    order, keys = [label for label, _ in candidates] + [ROUTER], [key for key, _ in shapes]
    place = lambda label: order.index(label) if label in order else len(order)  # kept rows of earlier levers last
    rows = sorted(rows + list(kept.values()), key=lambda row: (keys.index(row["experts"]), place(row["setting"])))
    write(name, rows, base, time.perf_counter() - start, only, report=report)


def size_option(parser) -> None:
    parser.add_argument("--size", type=float, nargs="+", help="rows at these --size shares instead of 25%% and 50%% "
                        "of the experts removed (writes levers-size-<model>)")


if __name__ == "__main__":
    main()
