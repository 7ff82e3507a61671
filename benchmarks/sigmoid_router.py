"""The router fit for sigmoid routers (DeepSeek-V3): does it earn its place in the default? Measured like
benchmarks/choices.py, on held-out train text (chooses) with validation beside it, on the bundled DeepSeek-V3-
shaped model at 25% and 50% of the experts removed, against the default without it and the strongest baselines.

    python -m benchmarks.sigmoid_router [--model deepseek-v3]   # writes benchmarks/results/sigmoid-router-<model>.{md,json}
    python -m benchmarks.sigmoid_router --only "REAP"   # reruns the rows whose label holds the text, keeps the others
"""

from __future__ import annotations

import time

from benchmarks.choices import bundled_model, kept_rows, measure, write
from benchmarks.quality import CLOSED_FORM_FITS
from hcsmoe.fitting.refit import RefitOptions
from hcsmoe.fitting.router_fit import RouterFitOptions
from hcsmoe.recipe import DEFAULT_ROUTER_FIT

REPORT = "sigmoid-router"
WITHOUT = RouterFitOptions(only_if_softmax=True, sigmoid=False)  # the default before this fit: skipped for sigmoid routers
ROWS_ONLY = RouterFitOptions(only_if_softmax=True, choice_bias=False)
CANDIDATES: list[tuple[str, dict]] = [
    ("**default** (sigmoid router fit: rows and correction bias)", {}),
    ("default, router rows fitted, correction bias as merged", {"router_fit": ROWS_ONLY}),
    ("default without the router fit (before this change)", {"router_fit": WITHOUT}),
    ("--fast (with the sigmoid router fit)", {"fast": True}),
    ("--fast without the router fit", {"fast": True, "router_fit": WITHOUT}),
    ("REAP as published", {"method": "reap"}),
    ("REAP + fits", {"method": "reap"} | CLOSED_FORM_FITS),
    ("REAP + fits + expert fit", {"method": "reap"} | CLOSED_FORM_FITS | {"refit": RefitOptions(steps=30)}),
    ("HC-SMoE as published", {"method": "hc-smoe"}),
    ("default, merge or prune chosen after the expert fit (--choose-fitted)", {"refit": RefitOptions(steps=30, choose_fitted=True)}),
]
assert DEFAULT_ROUTER_FIT.sigmoid and DEFAULT_ROUTER_FIT.choice_bias  # the first row is the default


def main() -> None:
    start = time.perf_counter()
    name, tokenizer, original, only = bundled_model(__doc__, with_only=True)
    rows, base = measure(original, tokenizer, CANDIDATES, kept_rows(name, only, REPORT))
    write(name, rows, base, time.perf_counter() - start, only, REPORT)


if __name__ == "__main__":
    main()
