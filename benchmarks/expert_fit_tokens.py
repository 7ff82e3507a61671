"""Which calibration tokens the default's expert fit uses after the per-layer choice: all of them (the default),
or only the 7/8 the candidates' closed-form fits used (before). Measured like benchmarks/choices.py, on
held-out train text (chooses) with validation beside it, at 25% and 50% of the experts removed.

    python -m benchmarks.expert_fit_tokens [--model qwen2-moe|deepseek-v3] [--threads N]
    # writes benchmarks/results/expert-fit-tokens-<model>.{md,json}
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import hcsmoe.fitting.choice as choice
import hcsmoe.fitting.stage as stage
from benchmarks.choices import bundled_model, measure, write

REPORT = "expert-fit-tokens"
DEFAULT = "**default**: the expert fit on all calibration tokens"
BEFORE = "the expert fit on the fitting part only (7/8; before)"


@contextmanager
def fitting_part_only():
    """The expert fit as it was before: on the tokens the closed-form fits used (fitting_tokens)."""
    before = lambda layer_plan, block, refit: stage.fitting_tokens(layer_plan, block)
    kept = stage.expert_fit_tokens
    stage.expert_fit_tokens = choice.expert_fit_tokens = before
    try:
        yield
    finally:
        stage.expert_fit_tokens = choice.expert_fit_tokens = kept


def main() -> None:
    start = time.perf_counter()
    name, tokenizer, original = bundled_model(__doc__)
    rows, base = measure(original, tokenizer, [(DEFAULT, {})], {})
    with fitting_part_only():
        before, _ = measure(original, tokenizer, [(BEFORE, {})], {})
    rows = sorted(rows + before, key=lambda row: -row["experts"])
    write(name, rows, base, time.perf_counter() - start, report=REPORT)


if __name__ == "__main__":
    main()
