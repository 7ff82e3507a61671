"""How the default compressor was chosen: candidates measured on held-out *train* text of both bundled models.

Choices are made on held-out train slices (the last 300 articles of each language's train split, which the
calibration blocks never reach: 65,536 calibration tokens cover the first ~150 articles of each language);
validation numbers are reported beside them, never used to choose. Each cell is perplexity divided by the
original model's on the same text (first 8,192 tokens of each); "mean" is the mean over en/fr/es.

    python -m benchmarks.choices [--model reference|qwen2-moe]   # writes benchmarks/results/choices-<model>.{md,json}
    python -m benchmarks.choices --only "expert fit"   # reruns the rows whose label holds the text, keeps the others
                                                      # (a regular expression: "a|b", "a$")
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from transformers.utils import logging

from hcsmoe.checkpoints.architectures import architecture_for, expert_count
from hcsmoe.calibration.text import LANGUAGES, wiki_texts
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.checkpoints.loading import BUNDLED_MODELS, load_model, load_tokenizer
from hcsmoe.pipeline import compress
from hcsmoe.fitting.refit import RefitOptions

RESULTS = Path(__file__).parent / "results"
HELD_OUT_ARTICLES = 300
MAX_TOKENS = 8192
PLAIN = partial(RefitOptions, whiten=False)  # the expert fit's plain steps (--no-refit-whiten)
MERGE = {"method": "ream", "assignment": "nearest", "group_size": 0, "merge": "select"}
# (label, compress() options); the default recipe is the row with {} (method None).
CANDIDATES: list[tuple[str, dict]] = [
    ("reap (pruning)", {"method": "reap"}),
    ("reap + refit", {"method": "reap", "refit": True}),
    ("reap + refit, corrective", {"method": "reap", "refit": True, "sequential": "corrective"}),
    ("hc-smoe + refit", {"method": "hc-smoe", "refit": True}),
    ("anchored pairs, neuron selection + router fit + refit", MERGE | {"refit": True, "router_fit": True}),
    ("per-layer choice (pairs or reap) + closed-form fits", {"sequential": False, "fast": True}),
    ("default --fast: per-layer choice + closed-form fits, corrective", {"fast": True}),
    ("default --fast, neurons selected by output energy (before least squares)", {"merge": "select-energy", "fast": True}),
    ("default, refit alpha 0.001", {"refit": RefitOptions(alpha=0.001)}),
    ("default, refit alpha 0.1", {"refit": RefitOptions(alpha=0.1)}),
    ("default + expert fit (gate/up and down, 30 plain L-BFGS steps, all tokens)", {"refit": PLAIN(steps=30)}),
    ("default + expert fit (30 plain steps on 8,192 tokens)", {"refit": PLAIN(steps=30, step_tokens=8192)}),
    ("default + expert fit (gate/up and down, 100 plain L-BFGS steps, all tokens)", {"refit": PLAIN(steps=100)}),
    ("**default**: + expert fit (gate/up and down, 30 whitened L-BFGS steps, all tokens)", {}),
    ("default, merge or prune chosen after the expert fit (--choose-fitted)", {"refit": RefitOptions(steps=30, choose_fitted=True)}),
]


def texts(train_label: str = "train") -> dict[str, list[str]]:
    """Held-out train articles (to choose on) and the validation splits (reported only), per language."""
    held_out = {f"{lang}-{train_label}": wiki_texts(lang, "train")[-HELD_OUT_ARTICLES:] for lang in LANGUAGES}
    return held_out | {f"{lang}-validation": wiki_texts(lang, "validation") for lang in LANGUAGES}


def bundled_model(description: str, with_only: bool = False,
                  arguments: Callable[[argparse.ArgumentParser], object] | None = None) -> tuple:
    """--model and --threads (and --only, if `with_only`) from the command line: the bundled model's name,
    tokenizer and model (float32) (and the --only text; and, if `arguments` adds options of its own, all the
    parsed arguments)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", choices=sorted(BUNDLED_MODELS))
    parser.add_argument("--threads", type=int, default=2)
    if with_only:
        parser.add_argument("--only", help="rerun only the rows whose label holds this text; the others come from "
                                           "the last run's JSON")
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    path = BUNDLED_MODELS[args.model]
    loaded = args.model, load_tokenizer(path), load_model(path)
    return (*loaded, *((args.only,) if with_only else ()), *((args,) if arguments is not None else ()))


def kept_rows(name: str, only: str | None, report: str = "choices") -> dict:
    """With --only: the last run's rows by (experts, label), except those whose label the text matches (a regular
    expression: "a|b" either, "a$" a label that ends so)."""
    if only is None:
        return {}
    saved = json.loads((RESULTS / f"{report}-{name}.json").read_text())["rows"]
    return {(r["experts"], r["setting"]): r for r in saved if not re.search(only, r["setting"])}


def expert_counts(config) -> list[tuple[int, dict]]:
    """The rows' keys and shapes: 25% and 50% of the experts removed."""
    e = expert_count(config, architecture_for(config))
    return [(k, {"num_experts": k}) for k in (e * 3 // 4, e // 2)]


def measure(original, tokenizer, candidates: list[tuple[str, dict]], kept: dict,
            shapes: list[tuple[int | str, dict]] | None = None) -> tuple[list[dict], dict]:
    """Every candidate at each of `shapes` (key, compress options; default: 25% and 50% of the experts removed),
    as perplexity ratios to the original on the held-out train slices and the validation splits (rows in `kept`
    are taken as they are); and the original's perplexities."""
    sources = texts()
    base = {name: m["ppl"] for name, m in evaluate(original, tokenizer, texts=sources, max_tokens=MAX_TOKENS)["languages"].items()}
    rows = []
    for k, shape in shapes or expert_counts(original.config):
        for label, options in candidates:
            if (k, label) in kept:
                rows.append(kept[(k, label)])
                continue
            mark = time.perf_counter()
            result = compress(original, tokenizer=tokenizer, progress=False, **shape, **options)
            seconds = time.perf_counter() - mark
            scores = evaluate(result.model.float(), tokenizer, texts=sources, max_tokens=MAX_TOKENS)["languages"]
            rows.append({"experts": k, "setting": label, "seconds": round(seconds, 1),
                         **{name: round(m["ppl"] / base[name], 4) for name, m in scores.items()}})
            print(json.dumps(rows[-1]), flush=True)
    return rows, base


def main() -> None:
    start = time.perf_counter()
    name, tokenizer, original, only = bundled_model(__doc__, with_only=True)
    rows, base = measure(original, tokenizer, CANDIDATES, kept_rows(name, only))
    write(name, rows, base, time.perf_counter() - start, only)


def mean(row: dict, split: str) -> float:
    return sum(row[f"{lang}-{split}"] for lang in LANGUAGES) / len(LANGUAGES)


def write(name: str, rows: list[dict], base: dict, seconds: float, only: str | None = None,
          report: str = "choices") -> None:
    columns = [f"{lang}-train" for lang in LANGUAGES]
    head = ("| experts | setting | " + " | ".join(columns) + " | **mean (train, chooses)** | mean (validation) | s |")
    lines = [head, "|" + "---|" * (len(columns) + 5)]
    for r in rows:
        lines.append(f"| {r['experts']} | {r['setting']} | " + " | ".join(f"{r[c]:.3f}" for c in columns)
                     + f" | **{mean(r, 'train'):.4f}** | {mean(r, 'validation'):.4f} | {r['seconds']:.0f} |")
    text = (f"Perplexity ratio to the original {name} model (original perplexity: "
            + ", ".join(f"{k} {v:.2f}" for k, v in base.items())
            + f") on the first {MAX_TOKENS} tokens of each text; train = last {HELD_OUT_ARTICLES} train articles per "
            f"language (used to choose), validation reported only.\n\n" + "\n".join(lines)
            + (f"\n\nWhole benchmark: {seconds / 60:.1f} min on {torch.get_num_threads()} threads.\n" if only is None else
               f"\n\nRows whose setting matches {only!r} rerun with the current code ({seconds / 60:.1f} min on "
               f"{torch.get_num_threads()} threads, `--only`); the others from earlier runs (the last full run or an earlier `--only`).\n"))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{report}-{name}.json").write_text(json.dumps({"rows": rows, "original_ppl": base,
                                                               "seconds": round(seconds, 1)}, indent=1) + "\n")
    (RESULTS / f"{report}-{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
