"""Every method, as published and with the fitting stages, on one bundled model: one table per size.

Each row compresses the model (32 -> 24 and 16 experts for the reference Qwen3-MoE, 60 -> 45 and 30 for the
Qwen2-MoE) and evaluates it on the **full** validation split of each language: perplexity, and against the
original KL(original || compressed), top-1 agreement and free-running generation (64 greedy tokens after
the first 32 tokens of each of the first 64 validation articles: mean matching prefix and token agreement).
Rows without fitting share one calibration; rows with it calibrate again (the fits need per-token data).
An ablation of the default recipe, the calibration-size table and multiple-choice accuracy (lm-eval, with
standard errors) close the report.

The original's logits on the validation windows are computed once and looked up by every row.

    python -m benchmarks.quality [--model qwen2-moe] [--no-ablation]   # writes benchmarks/results/quality-<model>.{md,json}
    python -m benchmarks.quality --only default   # reruns the rows whose label matches the regular expression
                                                  # "default", keeps the others
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.utils import logging

from hcsmoe.checkpoints.architectures import architecture_for, expert_count, moe_layers
from hcsmoe.calibration.text import LANGUAGES, wiki_texts
from hcsmoe.evaluation.tasks import BUNDLED_TASKS
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.evaluation.generation import generation_prompts, greedy_continuations
from hcsmoe.checkpoints.loading import BUNDLED_MODELS, load_model, load_tokenizer
from hcsmoe.recipe import DEFAULT_CALIBRATION
from hcsmoe.runners.in_memory import calibration_statistics, model_blocks
from hcsmoe.pipeline import compress

RESULTS = Path(__file__).parent / "results"
RANDOM_SEEDS = (0,)  # a floor, not a contender: one seed
PROMPTS = 64
# Each method as published, and with the default's closed-form fitting stages (router fit, down-projection refit,
# corrective sequential fitting; the router fit leaves a pruning plan as it is); the strongest baselines also with
# the expert fit, as the default has it. O-prune's fitted row re-applies its published plan (its subset search is
# the slow part). benchmarks/choices.py has the refit alone.
CLOSED_FORM_FITS = {"refit": True, "router_fit": True, "sequential": "corrective"}
FITS = {"as published": {}, "+ fits": CLOSED_FORM_FITS}
ALL_FITS = {"+ fits + expert fit": CLOSED_FORM_FITS | {"refit": {"steps": 30}}}
WITH_EXPERT_FIT = ("hc-smoe", "reap")
REUSE_PLAN = ("o-prune",)
BASELINES: list[tuple[str, dict]] = [
    ("hc-smoe", {"method": "hc-smoe"}),
    ("ream", {"method": "ream"}),
    ("reap", {"method": "reap"}),
    ("o-prune", {"method": "o-prune"}),
    ("s-prune", {"method": "s-prune"}),
    ("f-prune", {"method": "f-prune"}),
    ("m-smoe", {"method": "m-smoe"}),
    ("kmeans", {"method": "kmeans"}),
    ("ean", {"method": "ean"}),
    ("stun", {"method": "stun"}),
]
ABLATIONS: list[tuple[str, dict]] = [
    ("default without the expert fit (--fast)", {"fast": True}),
    ("default without the refit (nor the expert fit that follows it)", {"refit": False}),
    ("default without the router fit", {"router_fit": False}),
    ("default, not corrective (fitted on the original model's inputs)", {"sequential": False}),
    ("default, merging candidate only (no per-layer choice)",
     {"method": "ream", "merge": "select", "group_size": 0, "assignment": "nearest", "refit": {"steps": 30},
      "router_fit": True, "sequential": "corrective"}),
    ("default, frequency-weighted merge instead of neuron selection", {"merge": "frequency"}),
    ("default, English-only calibration", {"calibration": "wiki:en"}),
]
TOKEN_COUNTS = (8192, 32768)
# The default's variants: without the expert fit (--fast, the closed-form recipe), and with plain steps.
EXPERT_FITS = [("default --fast (closed form, no expert fit)", {"fast": True})] + [
    (f"default, expert fit with plain steps (--refit-steps {n} --no-refit-whiten)",
     {"refit": {"steps": n, "whiten": False}}) for n in (30, 100)]
TASK_ROWS = ("default", "reap", "hc-smoe")


def options_of(row_options: dict) -> dict:
    """compress() options for a row: {"refit": {...}} becomes RefitOptions."""
    from hcsmoe.fitting.refit import RefitOptions

    options = dict(row_options)
    if isinstance(options.get("refit"), dict):
        options["refit"] = RefitOptions(**options["refit"])
    return options


class RememberedLogits(torch.nn.Module):
    """The original model for scoring: every row scores the same validation windows, so the original's logits
    are computed once and then looked up (float32, exactly what the model returned), halving each row's cost."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.logits: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        key = hashlib.sha1(input_ids.cpu().numpy().tobytes() + str(tuple(input_ids.shape)).encode()).hexdigest()
        if key not in self.logits:
            self.logits[key] = self.model(input_ids=input_ids, use_cache=use_cache).logits
        return SimpleNamespace(logits=self.logits[key])


def previous_rows(name: str, only: str | None) -> dict:
    """With --only: the last full run's rows by (experts, label) and its task results (under "tasks"), except the
    rows to rerun; without it, nothing."""
    if only is None:
        return {}
    saved = json.loads((RESULTS / f"quality-{name}.json").read_text())
    rows = [r for group in [*saved["sizes"].values(), saved["ablation"], saved["calibration_tokens"]] for r in group]
    kept = {(r["experts"], r["method"]): r for r in rows if not re.search(only, r["method"])}
    kept |= {(int(k), "original"): rows[0] for k, rows in saved["sizes"].items()}
    return kept | {"tasks": {label: result for label, result in saved["tasks"].items() if not re.search(only, label)},
                   "tables": {"ablation": saved["ablation"], "calibration_tokens": saved["calibration_tokens"]}}


def size_rows(quick: bool = False) -> list[tuple[str, dict, str | None]]:
    """(label, compress() options, label of the row whose plan it re-applies or None) of each compressed row of a
    size table, in order: the default, the opt-in expert fits, each baseline as published and with the fits, random."""
    rows = [("**default**", {}, None)] + ([] if quick else [(label, options, None) for label, options in EXPERT_FITS])
    for name, options in BASELINES[:3:2] if quick else BASELINES:
        fits = FITS | (ALL_FITS if name in WITH_EXPERT_FIT else {})
        rows += [(f"{name} {suffix}", options | fit, f"{name} as published" if fit and name in REUSE_PLAN else None)
                 for suffix, fit in fits.items()]
    return rows + ([] if quick else [(f"random (seed {s})", {"method": "random", "seed": s}, None) for s in RANDOM_SEEDS])


class Bench:
    def __init__(self, path: Path, max_tokens: int | None, previous: dict, prompts: int = PROMPTS,
                 shared_stats: bool = True):
        self.path, self.max_tokens, self.previous = path, max_tokens, previous
        self.tokenizer, self.original = load_tokenizer(path), load_model(path)
        self.reference = RememberedLogits(self.original)
        self.prompts = {lang: generation_prompts(self.tokenizer, wiki_texts(lang, "validation"), prompts)
                        for lang in LANGUAGES}
        self.generations = {lang: greedy_continuations(self.original, p) for lang, p in self.prompts.items()}
        self.last_plan = None
        architecture = architecture_for(self.original.config)
        self.experts = expert_count(self.original.config, architecture)
        self.stats = None if not shared_stats else calibration_statistics(self.original, architecture, moe_layers(self.original, architecture),
                                            model_blocks(self.original, self.tokenizer, DEFAULT_CALIBRATION, None, 2048),
                                            DEFAULT_CALIBRATION, output_samples=512, progress=False,
                                            with_weight_gram=True)  # STUN's survivors

    def score(self, model, generate: int) -> dict:
        result = evaluate(model.float(), self.tokenizer, reference=self.reference, languages=LANGUAGES,
                          max_tokens=self.max_tokens, generate=generate, reference_generations=self.generations)
        row = {}
        for lang, m in result["languages"].items():
            row |= {f"{lang}/{key}": m[key] for key in ("ppl", "kl", "top1", "gen_prefix", "gen_agree") if key in m}
        return row

    def size_table(self, k: int, generate: int, quick: bool = False, which=size_rows) -> list[dict]:
        """The compressed rows of one size (`which`: size_rows, or a selection of them), each evaluated by score();
        a row that re-applies another's plan recomputes it when that row came from an earlier run."""
        plans, rows = {}, []
        for label, options, reuse in which(quick):
            reused = {"plan": plans[reuse]} if plans.get(reuse) is not None else {}
            rows.append(self.row(label, k, options | reused, generate))
            plans[label] = self.last_plan
        return rows

    def row(self, label: str, k: int, options: dict, generate: int) -> dict:
        if (k, label) in self.previous:
            self.last_plan = None
            return self.previous[(k, label)]
        start = time.perf_counter()
        options = options_of(options)
        fitted = (options.get("method") is None or options.get("refit") or options.get("router_fit")
                  or options.get("sparsity"))
        shared = {} if fitted or "calibration" in options or "num_blocks" in options else {"stats": self.stats}
        result = compress(self.original, tokenizer=self.tokenizer, progress=False, **shared, **options,
                          **({} if "plan" in options or "size" in options else {"num_experts": k}))
        self.last_plan = result.plan
        seconds = time.perf_counter() - start
        row = {"experts": k, "method": label, "seconds": round(seconds, 1), **self.score(result.model, generate)}
        print(json.dumps(row), flush=True)
        return row

    def original_row(self) -> dict:
        result = evaluate(self.original, self.tokenizer, languages=LANGUAGES, max_tokens=self.max_tokens)
        return {"experts": self.experts, "method": "original",
                **{f"{lang}/ppl": m["ppl"] for lang, m in result["languages"].items()}}

    def tasks(self, models: dict[str, object]) -> dict:
        results = {}
        for label, model in models.items():
            result = evaluate(model.float(), self.tokenizer, languages=(), tasks=BUNDLED_TASKS)
            results[label] = result["tasks"]
            print(json.dumps({label: results[label]}), flush=True)
        return results


def model_bench(description: str, shared_stats: bool = False,
                arguments=None) -> tuple[argparse.Namespace, Bench, dict]:
    """--model, --max-tokens and --threads parsed and applied (with a benchmark's own, added by `arguments(parser)`),
    the Bench (with the shared statistics only if asked) and the original's row: the start of every benchmark
    that scores a few compressed models of one bundled model."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", choices=sorted(BUNDLED_MODELS))
    parser.add_argument("--max-tokens", type=int, help="validation tokens per language [all]")
    parser.add_argument("--threads", type=int, default=2)
    if arguments is not None:
        arguments(parser)
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    bench = Bench(BUNDLED_MODELS[args.model], args.max_tokens, {}, shared_stats=shared_stats)
    return args, bench, bench.original_row()


def ratio(row: dict, original: dict) -> float:
    return sum(row[f"{l}/ppl"] / original[f"{l}/ppl"] for l in LANGUAGES) / len(LANGUAGES)


def table(rows: list[dict], original: dict) -> str:
    head = ("| experts | method | " + " | ".join(f"{l} ppl" for l in LANGUAGES) + " | mean ratio | "
            + " | ".join(f"{l} KL" for l in LANGUAGES) + " | top-1 (mean) | gen prefix (mean) | gen agree (mean) | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mean = lambda key: sum(r.get(f"{l}/{key}", float("nan")) for l in LANGUAGES) / len(LANGUAGES)
        cells = [str(r["experts"]), r["method"]] + [f"{r[f'{l}/ppl']:.2f}" for l in LANGUAGES]
        cells.append(f"{ratio(r, original):.3f}")
        if r["method"] == "original":
            cells += ["–"] * (len(LANGUAGES) + 4)
        else:
            cells += [f"{r[f'{l}/kl']:.3f}" for l in LANGUAGES] + [f"{mean('top1'):.3f}"]
            cells += [f"{mean('gen_prefix'):.1f}", f"{mean('gen_agree'):.3f}"] if "en/gen_prefix" in r else ["", ""]
            cells.append(f"{r['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(results: dict) -> str:
    names = sorted({t for r in results.values() for t in r})
    lines = ["| model | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for label, tasks in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{tasks[t]['acc']:.3f} ± {tasks[t]['acc_stderr']:.3f}"
                                                 for t in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="reference", choices=sorted(BUNDLED_MODELS))
    parser.add_argument("--max-tokens", type=int, help="validation tokens per language [all]")
    parser.add_argument("--quick", action="store_true", help="default, reap and hc-smoe rows only (a smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-ablation", action="store_true", help="skip the ablation and calibration-size tables "
                                                                    "(with --only: keep the earlier run's)")
    parser.add_argument("--only", help="rerun only the rows whose label matches this regular expression; the others "
                                       "come from the last full run's JSON (after a change that only they see)")
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    bench = Bench(BUNDLED_MODELS[args.model], args.max_tokens, previous_rows(args.model, args.only))
    original = bench.previous.get((bench.experts, "original")) or bench.original_row()
    sizes = {k: [original] + bench.size_table(k, PROMPTS if k == bench.experts // 2 else 0, args.quick)
             for k in (bench.experts * 3 // 4, bench.experts // 2)}
    k = bench.experts // 2
    earlier = bench.previous.get("tables", {"ablation": [], "calibration_tokens": []})  # --no-ablation --only keeps them
    ablation = [] if args.quick else earlier["ablation"] if args.no_ablation else [
        bench.row(label, k, options, 0) for label, options in ABLATIONS]
    token_rows = [] if args.quick else earlier["calibration_tokens"] if args.no_ablation else [
        bench.row(f"default, {n} calibration tokens", k, {"num_blocks": n // bench.original.config.max_position_embeddings,
                                                          "block_size": bench.original.config.max_position_embeddings}, 0)
        for n in TOKEN_COUNTS]
    kept_tasks = bench.previous.get("tasks", {})  # with --only: the task rows not to rerun
    models = {} if "original" in kept_tasks else {"original": bench.original}
    for label in TASK_ROWS:
        if f"{label}, {k} experts" not in kept_tasks:
            options = {} if label == "default" else {"method": label}
            models[f"{label}, {k} experts"] = compress(bench.original, tokenizer=bench.tokenizer, num_experts=k,
                                                       progress=False, **options).model
    tasks = kept_tasks | bench.tasks(models)
    tasks = {label: tasks[label] for label in ["original"] + [f"{t}, {k} experts" for t in TASK_ROWS]}
    total = time.perf_counter() - begin
    write(args.model, sizes, ablation, token_rows, tasks, original, total, args.max_tokens, args.quick, args.only)


def write(name: str, sizes: dict, ablation: list, token_rows: list, tasks: dict, original: dict, total: float,
          max_tokens: int | None, quick: bool, only: str | None = None) -> None:
    scope = f"first {max_tokens} tokens of each validation split" if max_tokens else "full validation splits"
    parts = [f"# Quality on the bundled {name} model ({scope})", ""]
    for k, rows in sizes.items():
        parts += [f"## {k} experts kept", "", table(rows, original), ""]
    if ablation:
        parts += ["## Ablation of the default recipe", "", table([original] + ablation, original), ""]
    if token_rows:
        parts += ["## Calibration size", "", table([original] + token_rows, original), ""]
    parts += ["## Multiple choice (lm-eval, accuracy ± standard error; near chance at this size)", "",
              task_table(tasks), ""]
    if only is None:
        parts.append(f"Whole benchmark: {total / 60:.1f} min on {torch.get_num_threads()} threads.")
    else:
        parts.append(f"Rows whose label holds {only!r} rerun with the current code ({total / 60:.1f} min on "
                     f"{torch.get_num_threads()} threads, `--only {only}`); the others are from earlier runs (the last full run or an earlier `--only`).")
    RESULTS.mkdir(exist_ok=True)
    stem = f"quality-{name}" + ("-quick" if quick or max_tokens else "")
    (RESULTS / f"{stem}.md").write_text("\n".join(parts) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps(
        {"sizes": {str(k): rows for k, rows in sizes.items()}, "ablation": ablation, "calibration_tokens": token_rows,
         "tasks": tasks, "total_seconds": round(total, 1), "max_tokens_per_language": max_tokens,
         "rerun_only": only}, indent=1) + "\n")
    print("\n".join(parts))


if __name__ == "__main__":
    main()
