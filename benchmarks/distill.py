"""The opt-in end-to-end stage (--distill-steps) on top of the default, at the default's own shapes (--size 0.5 and
--size 0.75), scored as benchmarks/quality.py scores its rows (full validation splits: perplexity, KL to the
original, top-1 agreement, 64 greedy continuations). The default's rows are read from benchmarks/size.py's
results (the same recipe writes the same bits), so run that first.

    python -m benchmarks.distill [--model qwen2-moe|deepseek-v3] [--threads 1] [--steps 200] [--lr 1e-4]
    # writes benchmarks/results/distill-<model>.{md,json} (distill-<model>-lr<LR>.* for another --lr)
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks.quality import PROMPTS, RESULTS, model_bench, ratio
from benchmarks.size import mean
from hcsmoe.calibration.text import LANGUAGES
from hcsmoe.fitting.distill import DistillOptions
from hcsmoe.pipeline import compress
from hcsmoe.sizing import model_shape

FRACTIONS = (0.5, 0.75)


def size_result(model: str, fraction: float) -> tuple[dict, dict]:
    """The chosen shape and its row in benchmarks/size.py's results for `fraction`."""
    stem = f"size-{model}" + (f"-{fraction:g}" if fraction != 0.5 else "")
    saved = json.loads((RESULTS / f"{stem}.json").read_text())
    chosen = saved["size"]["chosen"]
    row = next(r for r in saved["rows"] if (r["experts"], r["width"]) == (chosen["experts"], chosen["width"]))
    return chosen, row


def table(rows: list[dict], original: dict) -> str:
    head = ("| size | experts × neurons | setting | " + " | ".join(f"{lang} ppl" for lang in LANGUAGES)
            + " | mean ratio | mean KL | top-1 (mean) | gen prefix (mean) | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r['fraction']:g}", f"{r['experts']} × {r['width']}", r["setting"]]
        cells += [f"{r[f'{lang}/ppl']:.2f}" for lang in LANGUAGES]
        cells += [f"{ratio(r, original):.4f}", f"{mean(r, 'kl'):.4f}", f"{mean(r, 'top1'):.3f}",
                  f"{mean(r, 'gen_prefix'):.2f}", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    begin = time.perf_counter()

    def arguments(parser) -> None:
        parser.add_argument("--steps", type=int, default=DistillOptions.steps, help="--distill-steps [200]")
        parser.add_argument("--lr", type=float, default=DistillOptions.lr, help="--distill-lr [1e-4]")

    args, bench, original = model_bench(__doc__, arguments=arguments)
    stage = DistillOptions(steps=args.steps, lr=args.lr)
    _, full_width, _ = model_shape(bench.original.config)
    rows = []
    for fraction in FRACTIONS:
        chosen, default = size_result(args.model, fraction)
        width = chosen["width"] if chosen["width"] is not None and chosen["width"] < full_width else None
        rows.append({"fraction": fraction, "setting": "**default**", **default})
        start = time.perf_counter()
        result = compress(bench.original, tokenizer=bench.tokenizer, num_experts=chosen["experts"], width=width,
                          distill=stage, progress=False)
        row = {"fraction": fraction, "setting": f"default + end-to-end stage (--distill-steps {stage.steps}"
                                                 + (f" --distill-lr {stage.lr:g})" if stage.lr != DistillOptions.lr else ")"),
               "experts": chosen["experts"], "width": chosen["width"] or full_width,
               "seconds": round(time.perf_counter() - start, 1), "distill": result.plan.distill,
               **bench.score(result.model, PROMPTS)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    text = "\n".join([
        f"# The end-to-end stage on the bundled {args.model} model (full validation splits)", "",
        ("The default at the shape --size chose (its row from benchmarks/size.py's results, the same bits) and the "
         "same with the opt-in end-to-end stage; s: compression time (the stage included; the default's from the "
         "size run, under another load)."), "",
        table(rows, original), "",
        f"Whole benchmark: {(time.perf_counter() - begin) / 60:.1f} min on {torch.get_num_threads()} threads."])
    RESULTS.mkdir(exist_ok=True)
    stem = f"distill-{args.model}" + (f"-lr{stage.lr:g}" if stage.lr != DistillOptions.lr else "")
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"original": original, "rows": rows}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
