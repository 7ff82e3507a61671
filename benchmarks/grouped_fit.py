"""How much of the expert fit a large layer's schedule keeps: the fit forced into groups on a bundled model.

A real model's layer is too large to fit whole (expert_fit.fit_schedule: Qwen3-30B's would take 64 GB), so its
experts are fitted a group at a time, the others held as they are. The bundled
models' layers are small enough to fit whole; here their schedule is forced to what a large layer gets (groups
of a quarter of the experts, as the default's 8 GiB gives Qwen3-30B's layers at 64 experts, formed by coupling
as the fit forms them or of consecutive experts as it did before, or of one expert, as --refit-memory 0.5 does;
SHORT_HISTORY pairs), at 25% of the experts removed,
and each row is scored on the held-out train text of benchmarks.choices (where a setting may be chosen) and on
validation. "share of the fit's gain" is (--fast - row) / (--fast - whole layer) of the held-out train mean;
"layer error" is the fit's relative squared error after it, averaged over the layers.

    python -m benchmarks.grouped_fit [--model qwen2-moe] [--threads N]   # writes benchmarks/results/grouped-fit-<model>.{md,json}
    python -m benchmarks.grouped_fit --only "1 expert"   # reruns the rows whose label matches, keeps the others
"""

from __future__ import annotations

import json
import time
from itertools import pairwise

from benchmarks.choices import (
    MAX_TOKENS,
    RESULTS,
    bundled_model,
    kept_rows,
    mean,
    texts,
)
from hcsmoe.checkpoints.architectures import architecture_for, expert_count
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.fitting import expert_fit
from hcsmoe.pipeline import compress

WHOLE = "whole layer, 20 pairs (the bundled models' own schedule)"
COUPLED = expert_fit.coupled_groups
FAST = "--fast (no expert fit)"


def schedules(experts: int) -> list[tuple[str, object, object]]:
    """(label, fit_schedule replacement or None for the real one, how groups are formed) of each row: by
    coupling as the fit forms them (coupled_groups), or as the consecutive ranges fit_schedule gives (before)."""
    def forced(size: int):
        def schedule(count: int, per_expert: int, memory: int) -> tuple[list[range], int]:
            return [range(i, min(i + size, count)) for i in range(0, count, size)], expert_fit.SHORT_HISTORY
        return schedule

    quarter = -(-experts // 4)
    return [(FAST, None, COUPLED), (WHOLE, None, COUPLED),
            (f"groups of {quarter} experts (by coupling), {expert_fit.SHORT_HISTORY} pairs", forced(quarter), COUPLED),
            (f"groups of {quarter} consecutive experts, {expert_fit.SHORT_HISTORY} pairs", forced(quarter), consecutive),
            (f"groups of 1 expert, {expert_fit.SHORT_HISTORY} pairs", forced(1), COUPLED)]


def consecutive(chunks: list, count: int, sizes: list[int]) -> list[range]:
    """coupled_groups' stand-in for the consecutive row: groups of these sizes in index order."""
    return [range(first, stop) for first, stop in pairwise([sum(sizes[:i]) for i in range(len(sizes) + 1)])]


def layer_error(plan) -> float | None:
    errors = [layer.details["refit"]["experts"]["error_after"] for layer in plan.layers
              if "experts" in layer.details.get("refit", {})]
    return sum(errors) / len(errors) if errors else None


def main() -> None:
    start = time.perf_counter()
    name, tokenizer, original, only = bundled_model(__doc__, with_only=True)
    sources = texts()
    base = {n: m["ppl"] for n, m in evaluate(original, tokenizer, texts=sources, max_tokens=MAX_TOKENS)["languages"].items()}
    k = expert_count(original.config, architecture_for(original.config)) * 3 // 4
    kept = kept_rows(name, only, report="grouped-fit")
    real, rows = expert_fit.fit_schedule, []
    for label, schedule, grouping in schedules(k):
        if (k, label) in kept:
            rows.append(kept[(k, label)])
            continue
        expert_fit.fit_schedule, expert_fit.coupled_groups = schedule or real, grouping
        mark = time.perf_counter()
        result = compress(original, tokenizer=tokenizer, num_experts=k, progress=False, fast=label == FAST)
        seconds = time.perf_counter() - mark
        scores = evaluate(result.model.float(), tokenizer, texts=sources, max_tokens=MAX_TOKENS)["languages"]
        rows.append({"experts": k, "setting": label, "seconds": round(seconds, 1), "layer_error": layer_error(result.plan),
                     **{n: round(m["ppl"] / base[n], 4) for n, m in scores.items()}})
        print(json.dumps(rows[-1]), flush=True)
    expert_fit.fit_schedule, expert_fit.coupled_groups = real, COUPLED
    labels = {label for label, _, _ in schedules(k)}
    rows += [row for row in kept.values() if row["setting"] not in labels]  # rows of an earlier commit, said in their label
    fast, whole = (mean(next(r for r in rows if r["setting"] == s), "train") for s in (FAST, WHOLE))
    lines = [f"# The expert fit forced into groups: bundled {name} model, {k} experts kept", "",
             (f"`python -m benchmarks.grouped_fit --model {name}`; {(time.perf_counter() - start) / 60:.0f} min for the rows "
               "this run computed (s: each row's compression). "
              "Perplexity over the original's; mean of en/fr/es. A row whose label names a commit was measured by "
              "that commit, whose code is gone since (`git checkout COMMIT && python -m benchmarks.grouped_fit` "
              "reruns it)."), "",
             "| schedule | held-out train (mean) | share of the fit's gain | validation (mean) | layer error | s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        share = "–" if r["setting"] in (FAST, WHOLE) else f"{(fast - mean(r, 'train')) / (fast - whole):.0%}"
        error = "–" if r["layer_error"] is None else f"{r['layer_error']:.4f}"
        lines.append(f"| {r['setting']} | {mean(r, 'train'):.4f} | {share} | {mean(r, 'validation'):.4f} | {error} "
                     f"| {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    (RESULTS / f"grouped-fit-{name}.json").write_text(json.dumps({"base": base, "rows": rows}, indent=1) + "\n")
    (RESULTS / f"grouped-fit-{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
