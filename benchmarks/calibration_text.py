"""Which calibration text the default recipe needs: the bundled languages mixed, English only, English plus
text sampled from the model itself (`self`), `self` alone, and the mix plus `self`.

The question a user with English text only asks: do French and Spanish survive? Each row compresses the
bundled model with the default recipe (and REAP as published, at 50% removed, for the English-only sources:
the plan alone) and reports perplexity over the original's on held-out train text (the last 300 train
articles per language, first 8,192 tokens: what choices are made on) and on the full validation splits
(reported only); "vs mixed" divides each language's validation perplexity by the mixed calibration's.

    python -m benchmarks.calibration_text [--model qwen2-moe]   # writes benchmarks/results/calibration-text-<model>.{md,json}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from benchmarks.choices import HELD_OUT_ARTICLES, MAX_TOKENS, bundled_model, texts
from hcsmoe.checkpoints.architectures import architecture_for, expert_count
from hcsmoe.calibration.text import LANGUAGES
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.recipe import DEFAULT_CALIBRATION
from hcsmoe.pipeline import compress

RESULTS = Path(__file__).parent / "results"
SOURCES = (DEFAULT_CALIBRATION, "wiki:en", "wiki:en+self", "self", f"{DEFAULT_CALIBRATION}+self")
PLAN_ONLY = (DEFAULT_CALIBRATION, "wiki:en", "wiki:en+self")  # REAP as published at 50% removed: the plan alone


def perplexities(model, tokenizer) -> dict[str, float]:
    """Per '{lang}-train' (first MAX_TOKENS of the held-out articles) and '{lang}-validation' (all of it)."""
    sources = texts()
    held_out = {name: text for name, text in sources.items() if name.endswith("-train")}
    validation = {name: text for name, text in sources.items() if name.endswith("-validation")}
    scores = (evaluate(model, tokenizer, texts=held_out, max_tokens=MAX_TOKENS)["languages"]
              | evaluate(model, tokenizer, texts=validation)["languages"])
    return {name: m["ppl"] for name, m in scores.items()}


def main() -> None:
    begin = time.perf_counter()
    name, tokenizer, original = bundled_model(__doc__)
    base = perplexities(original, tokenizer)
    e = expert_count(original.config, architecture_for(original.config))
    rows = []
    for k in (e * 3 // 4, e // 2):
        settings = [("default", source, {}) for source in SOURCES]
        settings += [("reap as published", source, {"method": "reap"}) for source in PLAN_ONLY if k == e // 2]
        for method, source, options in settings:
            mark = time.perf_counter()
            result = compress(original, tokenizer=tokenizer, num_experts=k, calibration=source, progress=False,
                              **options)
            seconds = time.perf_counter() - mark
            ppl = perplexities(result.model.float(), tokenizer)
            rows.append({"experts": k, "method": method, "calibration": source, "seconds": round(seconds, 1),
                         **{name: round(value / base[name], 4) for name, value in ppl.items()}})
            print(json.dumps(rows[-1]), flush=True)
    write(name, rows, base, time.perf_counter() - begin)


def mean(row: dict, split: str) -> float:
    return sum(row[f"{lang}-{split}"] for lang in LANGUAGES) / len(LANGUAGES)


def write(name: str, rows: list[dict], base: dict, seconds: float) -> None:
    mixed = {(r["experts"], r["method"]): r for r in rows if r["calibration"] == DEFAULT_CALIBRATION}
    header = ("| experts | method | calibration | en-train | fr-train | es-train | **mean (train)** | en-val | fr-val | "
              "es-val | mean (val) | val vs mixed (en / fr / es) | s |")
    lines = [f"# Calibration text on the bundled {name} model", "",
             "Perplexity over the original's (original: " + ", ".join(f"{k} {v:.2f}" for k, v in base.items()) + "); "
             f"train = last {HELD_OUT_ARTICLES} train articles per language, first {MAX_TOKENS} tokens (what choices "
             "are made on); val = full validation splits (reported only). 'vs mixed': validation perplexity over the "
             f"same method's with the mixed calibration ({DEFAULT_CALIBRATION}).", "", header,
             "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        ref = mixed.get((r["experts"], r["method"]))
        versus = " / ".join(f"{r[f'{lang}-validation'] / ref[f'{lang}-validation']:.2f}" for lang in LANGUAGES) if ref else "–"
        lines.append(f"| {r['experts']} | {r['method']} | `{r['calibration']}` | "
                     + " | ".join(f"{r[f'{lang}-train']:.3f}" for lang in LANGUAGES) + f" | **{mean(r, 'train'):.4f}** | "
                     + " | ".join(f"{r[f'{lang}-validation']:.3f}" for lang in LANGUAGES)
                     + f" | {mean(r, 'validation'):.4f} | {versus} | {r['seconds']:.0f} |")
    lines += ["", f"Whole benchmark: {seconds / 60:.1f} min on {torch.get_num_threads()} threads."]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"calibration-text-{name}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"calibration-text-{name}.json").write_text(json.dumps(
        {"original_ppl": base, "rows": rows, "total_seconds": round(seconds, 1)}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
