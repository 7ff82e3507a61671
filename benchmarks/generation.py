"""Free-running generation at 50% of the experts removed, with standard errors.

benchmarks.quality reports how long greedy continuations follow the original's (the mean matching prefix) on
64 prompts per language, without its spread. One prompt's prefix ranges from 0 to all 64 generated tokens,
so those means move by chance. This reruns the 50%-removed rows of benchmarks.quality (the same compress
options, so the same models) on PROMPTS prompts per language (the first 32 tokens of the first validation
articles that long; the first 64 are quality's), and reports for each row the mean prefix over all prompts
± its standard error, and the paired difference to the default on the same prompts ± its standard error
(a difference within about two standard errors is not resolved by this many prompts).

    python -m benchmarks.generation [--model qwen2-moe] [--threads N]   # writes benchmarks/results/generation-<model>.{md,json}
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers.utils import logging

from benchmarks.quality import RESULTS, Bench
from hcsmoe.calibration.text import LANGUAGES
from hcsmoe.evaluation.generation import greedy_continuations, matching_prefix, standard_error
from hcsmoe.checkpoints.loading import BUNDLED_MODELS

PROMPTS = 256
DEFAULT = "**default**"


class GenerationBench(Bench):
    """quality's rows, scored by the matching prefix of each prompt's continuation only."""

    def score(self, model, generate: int) -> dict:
        model = model.float()
        return {f"{lang}/prefix": matching_prefix(self.generations[lang], greedy_continuations(model, prompts)).tolist()
                for lang, prompts in self.prompts.items()}


def prefixes(row: dict) -> torch.Tensor:
    """A row's per-prompt prefixes, all languages in order."""
    return torch.tensor([p for lang in LANGUAGES for p in row[f"{lang}/prefix"]], dtype=torch.float64)


def summary(row: dict, default: dict) -> dict:
    """Mean prefix per language and over all prompts ± its standard error, and the paired difference to the default."""
    mine = prefixes(row)
    difference = mine - prefixes(default)
    return {**{lang: sum(row[f"{lang}/prefix"]) / len(row[f"{lang}/prefix"]) for lang in LANGUAGES},
            "mean": float(mine.mean()), "se": standard_error(mine),
            "difference": float(difference.mean()), "difference_se": standard_error(difference)}


def table(rows: list[dict]) -> str:
    default = next(r for r in rows if r["method"] == DEFAULT)
    lines = ["| method | " + " | ".join(f"{lang}" for lang in LANGUAGES) + " | mean ± se | minus default ± se |",
             "|" + "---|" * (len(LANGUAGES) + 3)]
    for row in rows:
        s = summary(row, default)
        versus = "–" if row is default else f"{s['difference']:+.2f} ± {s['difference_se']:.2f}"
        lines.append(f"| {row['method']} | " + " | ".join(f"{s[lang]:.2f}" for lang in LANGUAGES)
                     + f" | {s['mean']:.2f} ± {s['se']:.2f} | {versus} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", choices=sorted(BUNDLED_MODELS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    bench = GenerationBench(BUNDLED_MODELS[args.model], None, {}, prompts=PROMPTS)
    k = bench.experts // 2
    rows = bench.size_table(k, PROMPTS)
    counts = {lang: len(p) for lang, p in bench.prompts.items()}
    text = (f"# Free-running generation on the bundled {args.model} model, {k} of {bench.experts} experts\n\n"
            f"Matching prefix: how many of the 64 greedy tokens after a 32-token validation prompt equal the "
            f"original model's, per prompt; mean per language, then over all {sum(counts.values())} prompts "
            f"({', '.join(f'{n} {lang}' for lang, n in counts.items())}) ± its standard error, and the paired "
            f"difference to the default on the same prompts ± its standard error. "
            f"`python -m benchmarks.generation --model {args.model}`; "
            f"{(time.perf_counter() - begin) / 60:.0f} min on {args.threads} thread{'s' * (args.threads > 1)}.\n\n{table(rows)}\n")
    (RESULTS / f"generation-{args.model}.json").write_text(json.dumps({"experts": k, "prompts": counts, "rows": rows}) + "\n")
    (RESULTS / f"generation-{args.model}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
