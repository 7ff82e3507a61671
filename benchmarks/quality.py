"""Every method on the same statistics: one table that ranks them on the reference model.

Calibration statistics (the default: English, French and Spanish train text interleaved, 32 blocks of
the model's context) are computed once and reused by every planner. Each compressed model is evaluated on the validation text of all three
languages: perplexity, KL(original || compressed) and top-1 agreement, plus the time to plan and
apply. A second, small table repeats hc-smoe and reap with English-only calibration (the paper's setting).

    python -m benchmarks.quality   # writes benchmarks/results/quality.md and .json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers.utils import logging

from hcsmoe.adapters import architecture_for, moe_layers
from hcsmoe.apply import apply_plan_keeping_router
from hcsmoe.calibrate import Statistics
from hcsmoe.data import LANGUAGES
from hcsmoe.evaluate import evaluate
from hcsmoe.loading import REFERENCE_MODEL, load_model, load_tokenizer
from hcsmoe.pipeline import DEFAULT_CALIBRATION, calibration_statistics, compress
from hcsmoe.plan import make_planner, plan_model

RESULTS = Path(__file__).parent / "results"
RANDOM_SEEDS = (0, 1, 2)

# (row label, compress() options); every row shares the statistics of its calibration text.
METHODS: list[tuple[str, dict]] = [
    ("hc-smoe (average linkage, expert outputs)", {"method": "hc-smoe"}),
    ("hc-smoe, single linkage", {"method": "hc-smoe", "linkage": "single"}),
    ("hc-smoe, complete linkage", {"method": "hc-smoe", "linkage": "complete"}),
    ("hc-smoe, ward linkage", {"method": "hc-smoe", "linkage": "ward"}),
    ("hc-smoe, router-logit features", {"method": "hc-smoe", "representation": "router-logits"}),
    ("hc-smoe, weight features", {"method": "hc-smoe", "representation": "weights"}),
    ("hc-smoe, plain average merge", {"method": "hc-smoe", "merge": "average"}),
    ("hc-smoe, fix-dom merge", {"method": "hc-smoe", "merge": "fix-dom"}),
    ("kmeans", {"method": "kmeans"}),
    ("m-smoe", {"method": "m-smoe"}),
    ("f-prune", {"method": "f-prune"}),
    ("s-prune", {"method": "s-prune"}),
    ("o-prune", {"method": "o-prune"}),
    ("reap", {"method": "reap"}),
    ("ean", {"method": "ean"}),
]
MIXED_METHODS = [METHODS[0], ("reap", {"method": "reap"})]


def statistics(model, tokenizer, source: str) -> Statistics:
    """Calibrate once, with every optional statistic (o-prune's output samples included)."""
    architecture = architecture_for(model.config)
    layers = moe_layers(model, architecture)
    return calibration_statistics(model, architecture, layers, tokenizer, source, output_samples=512,
                                  with_weight_gram=True, progress=False)


def scores(model, tokenizer, original, max_tokens: int | None) -> dict:
    result = evaluate(model.float(), tokenizer, reference=original, languages=LANGUAGES, max_tokens=max_tokens)
    row = {}
    for lang, m in result["languages"].items():
        row |= {f"{lang}/ppl": m["ppl"], f"{lang}/kl": m["kl"], f"{lang}/top1": m["top1"]}
    return row


def mean_rows(rows: list[dict]) -> dict:
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}


def run_method(options: dict, k: int, stats: Statistics, tokenizer, original, max_tokens) -> dict:
    start = time.perf_counter()
    result = compress(original, tokenizer=tokenizer, num_experts=k, stats=stats, progress=False, **options)
    seconds = time.perf_counter() - start
    return scores(result.model, tokenizer, original, max_tokens) | {"seconds": seconds}


def full_router_row(k: int, stats: Statistics, tokenizer, original, max_tokens) -> dict:
    """The paper's original router behaviour: E rows kept, each routed to its group's merged expert."""
    start = time.perf_counter()
    model = copy.deepcopy(original)
    architecture = architecture_for(model.config)
    plan = plan_model(stats.layers, k, stats.top_k, make_planner("hc-smoe"), "average")
    apply_plan_keeping_router(model, architecture, moe_layers(model, architecture), plan)
    seconds = time.perf_counter() - start
    return scores(model, tokenizer, original, max_tokens) | {"seconds": seconds}


def table(rows: list[dict]) -> str:
    head = "| experts kept | method | " + " | ".join(f"{l} ppl" for l in LANGUAGES) + " | " + \
        " | ".join(f"{l} KL" for l in LANGUAGES) + " | en top-1 | plan+apply s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [str(r["experts"]), r["method"]] + [f"{r[f'{l}/ppl']:.2f}" for l in LANGUAGES]
        cells += [f"{r.get(f'{l}/kl', 0):.3f}" for l in LANGUAGES] + [f"{r.get('en/top1', 1):.3f}"]
        cells.append(f"{r['seconds']:.1f}" if "seconds" in r else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REFERENCE_MODEL), help="checkpoint to benchmark [bundled reference]")
    parser.add_argument("--max-tokens", type=int, default=8192, help="validation tokens per language [8192]")
    parser.add_argument("--methods", help="comma-separated row labels to run (a subset, for a quick check)")
    args = parser.parse_args()
    max_tokens = args.max_tokens
    wanted = args.methods.split(",") if args.methods else None
    methods = [(label, options) for label, options in METHODS if wanted is None or label in wanted]
    logging.set_verbosity_error()
    torch.set_num_threads(2)
    begin = time.perf_counter()
    tokenizer, original = load_tokenizer(args.model), load_model(args.model)
    e = original.config.num_experts

    mark = time.perf_counter()
    stats = statistics(original, tokenizer, DEFAULT_CALIBRATION)
    calibration_seconds = time.perf_counter() - mark
    base = evaluate(original, tokenizer, languages=LANGUAGES, max_tokens=max_tokens)["languages"]
    rows = [{"experts": e, "method": "original", **{f"{l}/ppl": m["ppl"] for l, m in base.items()}}]
    mixed_rows = list(rows)
    for k in (e * 3 // 4, e // 2):
        for label, options in methods:
            rows.append({"experts": k, "method": label, **run_method(options, k, stats, tokenizer, original, max_tokens)})
            print(json.dumps(rows[-1]), flush=True)
        random_runs = [run_method({"method": "random", "seed": s}, k, stats, tokenizer, original, max_tokens)
                       for s in RANDOM_SEEDS]
        rows.append({"experts": k, "method": f"random (mean of {len(RANDOM_SEEDS)} seeds)", **mean_rows(random_runs)})
        rows.append({"experts": k, "method": "hc-smoe keeping all router rows (reference only, not smaller)",
                     **full_router_row(k, stats, tokenizer, original, max_tokens)})

    mixed = statistics(original, tokenizer, "wiki:en")
    for k in (e * 3 // 4, e // 2):
        for label, options in MIXED_METHODS:
            mixed_rows.append({"experts": k, "method": label + " [English-only calibration]",
                               **run_method(options, k, mixed, tokenizer, original, max_tokens)})
            print(json.dumps(mixed_rows[-1]), flush=True)

    total = time.perf_counter() - begin
    RESULTS.mkdir(exist_ok=True)
    name = "quality" if args.model == str(REFERENCE_MODEL) and wanted is None else "quality-partial"
    (RESULTS / f"{name}.json").write_text(json.dumps(
        {"rows": rows, "mixed_calibration_rows": mixed_rows, "calibration_seconds": calibration_seconds,
         "total_seconds": total, "max_tokens_per_language": max_tokens}, indent=1) + "\n")
    text = (f"Evaluated on the first {max_tokens} tokens of each validation split. "
            f"Default calibration, English, French and Spanish train text ({stats.info['tokens']} tokens, computed "
            f"once in {calibration_seconds:.1f} s):\n\n{table(rows)}\n\nEnglish-only calibration (the paper's "
            f"setting):\n\n{table(mixed_rows)}\n\n"
            f"Whole benchmark: {total / 60:.1f} min on {torch.get_num_threads()} threads.\n")
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
