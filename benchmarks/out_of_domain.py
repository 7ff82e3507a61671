"""Does the expert fit overfit its calibration text? The default recipe against `--fast` (the same plan with the
closed-form fits only) on English prose unlike the calibration's Wikipedia leads: two of Jane Austen's novels
(hcsmoe/corpora/novels/, public domain). The models are calibrated on the bundled Wikipedia train text as always.

Texts, each as perplexity over the original model's on the same tokens:
- novel-dev: Pride and Prejudice, first 32,768 tokens: what a setting against overfitting may be chosen on;
- novel-test: Persuasion, all of it: reported only;
- wiki held-out train (the last 300 train articles per language, first 8,192 tokens; mean of en/fr/es) and
  wiki validation (full splits; mean of en/fr/es), for comparison with the in-domain tables.

    python -m benchmarks.out_of_domain [--model reference|qwen2-moe]   # writes benchmarks/results/out-of-domain-<model>.{md,json}
    python -m benchmarks.out_of_domain --only "anchor"   # reruns the rows the regular expression matches, keeps the others
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from benchmarks.choices import MAX_TOKENS, bundled_model, mean
from benchmarks.choices import texts as choices_texts
from hcsmoe.calibration.text import load_texts
from hcsmoe.checkpoints.architectures import architecture_for, expert_count
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.fitting.refit import RefitOptions
from hcsmoe.pipeline import compress
from hcsmoe.recipe import EXPERT_FIT_STEPS

RESULTS = Path(__file__).parent / "results"
NOVELS = Path(__file__).resolve().parent.parent / "hcsmoe" / "corpora" / "novels"
DEV_TOKENS = 32768
ANCHORS = (0.1, 1.0, 10.0)


def texts() -> list[tuple[int | None, dict[str, list[str]]]]:
    """The texts by name, grouped by the tokens each is cut to: novel-dev to DEV_TOKENS, the held-out train
    articles to MAX_TOKENS (benchmarks.choices' texts), Persuasion and the validation splits whole."""
    wiki = choices_texts()
    novel = lambda name: load_texts(str(NOVELS / f"austen-{name}.jsonl.gz"))
    return [(DEV_TOKENS, {"novel-dev": novel("prideprejudice")}),
            (MAX_TOKENS, {name: text for name, text in wiki.items() if name.endswith("-train")}),
            (None, {"novel-test": novel("persuasion")} | {name: text for name, text in wiki.items()
                                                          if name.endswith("-validation")})]


def perplexities(model, tokenizer, sources: list[tuple[int | None, dict[str, list[str]]]]) -> dict[str, float]:
    return {name: m["ppl"] for budget, named in sources
            for name, m in evaluate(model, tokenizer, texts=named, max_tokens=budget)["languages"].items()}


def settings(num_experts: int) -> list[tuple[str, dict]]:
    """(label, compress() options): the default and --fast at 25% and 50% of the routed parameters removed,
    as a size (the default's shape) and as a count of whole experts; and the expert fit anchored toward the
    closed-form fits' weights (--refit-anchor) at 25% removed, where the fit loses on novel-dev."""
    quarter = [("size 0.75", {"size": 0.75}), (f"{num_experts * 3 // 4} experts", {"num_experts": num_experts * 3 // 4})]
    half = [("size 0.5", {"size": 0.5}), (f"{num_experts // 2} experts", {"num_experts": num_experts // 2})]
    recipes = [("default", {}), ("--fast", {"fast": True})]
    anchored = [(f"default, --refit-anchor {a:g}", {"refit": RefitOptions(steps=EXPERT_FIT_STEPS, anchor=a)})
                for a in ANCHORS]
    return ([(f"{shape}, {recipe}", options | extra) for shape, options in quarter for recipe, extra in recipes + anchored]
            + [(f"{shape}, {recipe}", options | extra) for shape, options in half for recipe, extra in recipes])


def write(name: str, rows: list[dict], base: dict, seconds: float, only: str | None = None) -> None:
    (RESULTS / f"out-of-domain-{name}.json").write_text(json.dumps({"rows": rows, "original": base}, indent=1) + "\n")
    lines = [f"# Out-of-domain text: {name} model", "",
             (f"`python -m benchmarks.out_of_domain --model {name}{f' --only {only!r}' if only else ''}` "
              f"({seconds / 60:.1f} min{', the other rows kept from the run before' if only else ''}). Perplexity over the "
              "original's: novel-dev = Pride and Prejudice (first 32,768 tokens), novel-test = Persuasion (whole); "
              "wiki train = held-out train articles (mean en/fr/es, 8,192 tokens each), wiki validation = full "
              "splits (mean en/fr/es). Calibration: the bundled Wikipedia train text."), "",
             "| setting | novel-dev | novel-test | wiki train | wiki validation | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['novel-dev']:.4f} | {r['novel-test']:.4f} | {mean(r, 'train'):.4f} | "
                     f"{mean(r, 'validation'):.4f} | {r['seconds']} |")
    lines += ["", "Original perplexities: " + ", ".join(f"{k} {v:.2f}" for k, v in base.items()), ""]
    (RESULTS / f"out-of-domain-{name}.md").write_text("\n".join(lines))


def main() -> None:
    start = time.perf_counter()
    name, tokenizer, original, only = bundled_model(__doc__, with_only=True)
    sources = texts()
    base = perplexities(original, tokenizer, sources)
    saved = RESULTS / f"out-of-domain-{name}.json"
    kept = {r["setting"]: r for r in json.loads(saved.read_text())["rows"]} if only and saved.is_file() else {}
    rows = []
    for label, options in settings(expert_count(original.config, architecture_for(original.config))):
        if only and not re.search(only, label):
            rows.extend([kept[label]] if label in kept else [])  # a first run with --only leaves the others out
            continue
        mark = time.perf_counter()
        result = compress(original, tokenizer=tokenizer, progress=False, **options)
        seconds = round(time.perf_counter() - mark, 1)
        ppl = perplexities(result.model.float(), tokenizer, sources)
        rows.append({"setting": label, "seconds": seconds, **{k: round(v / base[k], 4) for k, v in ppl.items()}})
        print(json.dumps(rows[-1]), flush=True)
        write(name, rows, base, time.perf_counter() - start, only)  # each row as it comes: a stopped run keeps them
    write(name, rows, base, time.perf_counter() - start, only)


if __name__ == "__main__":
    main()
