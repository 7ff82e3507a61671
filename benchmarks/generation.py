"""Free-running generation at 50% (or 25%) of the routed parameters removed, with standard errors.

benchmarks.quality reports how long greedy continuations follow the original's (the mean matching prefix) on
64 prompts per language, without its spread. One prompt's prefix ranges from 0 to all 64 generated tokens,
so those means move by chance. This runs the default as users get it (`--size`, every expert kept narrower
where that measures best) and `--fast` at that size, then the whole-expert rows of benchmarks.quality at the
same share (the same compress options, so the same models; its plain-step ablations left out) on PROMPTS
prompts per language (the first 32 tokens of the first validation articles that long; the first 64 are
quality's), and reports for each row the mean prefix over all prompts ± its standard error, and the paired
difference to the default on the same prompts ± its standard error (a difference within about two standard
errors is not resolved by this many prompts).

    python -m benchmarks.generation [--model qwen2-moe] [--threads N] [--fraction 0.75]
    # writes benchmarks/results/generation-<model>.{md,json} (F = 0.5) or generation-<model>-<F>.{md,json}
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers.utils import logging

from benchmarks.quality import EXPERT_FITS, RESULTS, Bench, size_rows
from hcsmoe.calibration.text import LANGUAGES
from hcsmoe.evaluation.generation import greedy_continuations, matching_prefix, standard_error
from hcsmoe.checkpoints.loading import BUNDLED_MODELS

PROMPTS = 256
DEFAULT = "**default**"


class GenerationBench(Bench):
    """The default's --size rows and quality's whole-expert rows, scored by the matching prefix of each prompt's
    continuation only."""

    def rows(self, fraction: float) -> list[dict]:
        k = round(self.experts * fraction)
        sized = [self.row(DEFAULT + f" (--size {fraction:g})", k, {"size": fraction}, PROMPTS),
                 self.row(f"default --fast (--size {fraction:g})", k, {"size": fraction, "fast": True}, PROMPTS)]
        whole = self.size_table(k, PROMPTS, which=whole_expert_rows)
        for row in whole:
            if row["method"] == DEFAULT:
                row["method"] = f"default, {k} whole experts"
        return sized + whole

    def score(self, model, generate: int) -> dict:
        model = model.float()
        return {f"{lang}/prefix": matching_prefix(self.generations[lang], greedy_continuations(model, prompts)).tolist()
                for lang, prompts in self.prompts.items()}


def prefixes(row: dict) -> torch.Tensor:
    """A row's per-prompt prefixes, all languages in order."""
    return torch.tensor([p for lang in LANGUAGES for p in row[f"{lang}/prefix"]], dtype=torch.float64)


def whole_expert_rows(quick: bool = False) -> list[tuple[str, dict, str | None]]:
    """quality's rows of one size without the default's plain-step ablations (they cost ten minutes each and
    answer another question)."""
    ablations = {label for label, _ in EXPERT_FITS[1:]}
    return [row for row in size_rows(quick) if row[0] not in ablations]


def summary(row: dict, default: dict) -> dict:
    """Mean prefix per language and over all prompts ± its standard error, and the paired difference to the default."""
    mine = prefixes(row)
    difference = mine - prefixes(default)
    return {**{lang: sum(row[f"{lang}/prefix"]) / len(row[f"{lang}/prefix"]) for lang in LANGUAGES},
            "mean": float(mine.mean()), "se": standard_error(mine),
            "difference": float(difference.mean()), "difference_se": standard_error(difference)}


def table(rows: list[dict]) -> str:
    default = next(r for r in rows if r["method"].startswith(DEFAULT))
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
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the routed parameters kept [0.5]")
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    bench = GenerationBench(BUNDLED_MODELS[args.model], None, {}, prompts=PROMPTS)
    rows = bench.rows(args.fraction)
    k = rows[-1]["experts"]
    counts = {lang: len(p) for lang, p in bench.prompts.items()}
    stem = f"generation-{args.model}" + (f"-{args.fraction:g}" if args.fraction != 0.5 else "")
    text = (f"# Free-running generation on the bundled {args.model} model, {args.fraction:g} of the routed parameters "
            f"(--size {args.fraction:g}; {k} of {bench.experts} whole experts)\n\n"
            f"Matching prefix: how many of the 64 greedy tokens after a 32-token validation prompt equal the "
            f"original model's, per prompt; mean per language, then over all {sum(counts.values())} prompts "
            f"({', '.join(f'{n} {lang}' for lang, n in counts.items())}) ± its standard error, and the paired "
            f"difference to the default on the same prompts ± its standard error. "
            f"`python -m benchmarks.generation --model {args.model}"
            f"{f' --fraction {args.fraction:g}' if args.fraction != 0.5 else ''}`; "
            f"{(time.perf_counter() - begin) / 60:.0f} min on {args.threads} thread{'s' * (args.threads > 1)}.\n\n{table(rows)}\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"fraction": args.fraction, "experts": k, "prompts": counts, "rows": rows}) + "\n")
    (RESULTS / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
