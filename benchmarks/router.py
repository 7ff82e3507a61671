"""Which K-row router should HC-SMoE (as published, `--method hc-smoe`, 32 calibration blocks) build? Measured on the reference model at 25% and 50% removed.

The default is chosen on a held-out slice of the English *train* text (the last articles, which the
calibration blocks never reach); validation numbers are reported beside it, never used to choose.
Calibration statistics are computed once per K and shared by the three router variants.

    python -m benchmarks.router   # writes benchmarks/results/router.md and .json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers.utils import logging

from hcsmoe.calibration.text import wiki_texts
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.checkpoints.loading import REFERENCE_MODEL, load_model, load_tokenizer
from hcsmoe.pipeline import compress
from hcsmoe.planners.plan import ROUTERS

RESULTS = Path(__file__).parent / "results"
SELECTION_ARTICLES = 400  # last English train articles: the selection slice


def main() -> None:
    logging.set_verbosity_error()
    torch.set_num_threads(2)
    start = time.perf_counter()
    tokenizer = load_tokenizer(REFERENCE_MODEL)
    original = load_model(REFERENCE_MODEL)
    texts = {"train-slice": wiki_texts("en", "train")[-SELECTION_ARTICLES:], "en-validation": wiki_texts("en", "validation")}
    experts = original.config.num_experts
    rows = []
    base = evaluate(original, tokenizer, texts=texts)
    rows.append({"experts": experts, "router": "original", **flatten(base)})
    for k in (experts * 3 // 4, experts // 2):
        stats = None
        for router in ROUTERS:
            result = compress(REFERENCE_MODEL, num_experts=k, router=router, stats=stats, method="hc-smoe",
                              num_blocks=32, progress=False)
            stats = result.stats
            scores = evaluate(result.model.float(), tokenizer, reference=original, texts=texts)
            rows.append({"experts": k, "router": router, **flatten(scores)})
            print(rows[-1], flush=True)
    write(rows, time.perf_counter() - start)


def flatten(result: dict) -> dict:
    out = {}
    for name, metrics in result["languages"].items():
        for key in ("ppl", "kl", "top1"):
            if key in metrics:
                out[f"{name}/{key}"] = round(metrics[key], 4)
    return out


def write(rows: list[dict], seconds: float) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "router.json").write_text(json.dumps({"rows": rows, "seconds": round(seconds, 1)}, indent=1) + "\n")
    lines = [
        "| experts | router | train-slice ppl | train-slice KL | en-validation ppl | en-validation KL | en-validation top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['experts']} | {r['router']} | {r['train-slice/ppl']:.2f} | {r.get('train-slice/kl', 0):.4f} | "
            f"{r['en-validation/ppl']:.2f} | {r.get('en-validation/kl', 0):.4f} | {r.get('en-validation/top1', 1):.3f} |"
        )
    (RESULTS / "router.md").write_text("\n".join(lines) + f"\n\nWhole benchmark: {seconds:.0f} s.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
