"""A size, not an expert count (--size): every shape of the grid at a share of the routed experts' parameters
(half by default), each compressed with the default recipe and evaluated on the full validation splits, and the
shape --size picks.

For each bundled model: the grid hcsmoe.sizing.config_shapes (shape_grid(E, I, F): K = F*E experts of all I neurons, i.e.
`-k F*E`, up to all E experts of F*I neurons), each shape compressed by the default recipe (`-k K --width I2`)
and scored as benchmarks.quality scores its rows (perplexity, KL to the original, top-1 agreement, 64 greedy
continuations); then the probe --size runs (the closed-form recipe on 16,384 calibration tokens per shape) and
the shape it chooses. --size's model is the chosen shape's row: the same recipe writes the same bits.

    python -m benchmarks.size [--model qwen2-moe] [--threads 1] [--fraction 0.75] [--only-chosen]
    # writes benchmarks/results/size-<model>.{md,json} (F = 0.5) or size-<model>-<F>.{md,json}; --only-chosen
    # compresses only the shape --size picks, the other rows kept from the last run's JSON (their calibration
    # tokens in their own column)
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks.quality import PROMPTS, RESULTS, model_bench, ratio
from hcsmoe.calibration.text import CALIBRATION_TOKENS, LANGUAGES
from hcsmoe.pipeline import compress
from hcsmoe.recipe import Recipe
from hcsmoe.sizing import choose_shape, config_shapes, model_shape

EARLIER_TOKENS = 65536  # the default's calibration tokens in rows measured before they were recorded


def options(parser) -> None:
    parser.add_argument("--fraction", type=float, default=0.5, help="share of the routed experts' parameters kept [0.5]")
    parser.add_argument("--only-chosen", action="store_true",
                        help="compress only the shape --size picks; the other rows come from the last run's JSON")


def mean(row: dict, key: str) -> float:
    return sum(row[f"{lang}/{key}"] for lang in LANGUAGES) / len(LANGUAGES)


def table(rows: list[dict], original: dict, chosen: dict, fraction: float) -> str:
    head = ("| experts | neurons | routed parameters kept | probe held-out error | calibration tokens | "
            + " | ".join(f"{lang} ppl" for lang in LANGUAGES) + " | mean ratio | mean KL | top-1 (mean) | "
            "gen prefix (mean) | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mark = f" **(--size {fraction:g})**" if (r["experts"], r["width"]) == (chosen["experts"], chosen["width"]) else ""
        cells = [f"{r['experts']}{mark}", str(r["width"]), f"{r['share']:.3f}", "–" if r["probe_error"] is None else f"{r['probe_error']:.4f}",
                 f"{r.get('calibration_tokens', EARLIER_TOKENS):,}"]
        cells += [f"{r[f'{lang}/ppl']:.2f}" for lang in LANGUAGES]
        cells += [f"{ratio(r, original):.4f}", f"{mean(r, 'kl'):.4f}", f"{mean(r, 'top1'):.3f}",
                  f"{mean(r, 'gen_prefix'):.2f}", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    begin = time.perf_counter()
    args, bench, original = model_bench(__doc__, arguments=options)
    fraction = args.fraction
    stem = f"size-{args.model}" + (f"-{fraction:g}" if fraction != 0.5 else "") + ("-quick" if args.max_tokens else "")
    earlier = {(r["experts"], r["width"]): r for r in json.loads((RESULTS / f"{stem}.json").read_text())["rows"]} \
        if args.only_chosen else {}
    start = time.perf_counter()
    _, record = choose_shape(bench.original, Recipe(size=fraction), tokenizer=bench.tokenizer, progress=False)
    probe_seconds = time.perf_counter() - start
    errors = {(t["experts"], t["width"]): t["held_out_error"] for t in record["grid"]}
    experts, width, _ = model_shape(bench.original.config)
    rows = []
    for k, neurons in config_shapes(bench.original.config, Recipe(), fraction):
        if (k, neurons) in earlier and (k, neurons) != (record["chosen"]["experts"], record["chosen"]["width"]):
            rows.append(earlier[(k, neurons)] | {"probe_error": errors.get((k, neurons))})
            continue
        start = time.perf_counter()
        model = compress(bench.original, tokenizer=bench.tokenizer, num_experts=k,
                         width=neurons if neurons < width else None, progress=False).model
        row = {"experts": k, "width": neurons, "share": k * neurons / (experts * width),
               "probe_error": errors.get((k, neurons)), "calibration_tokens": CALIBRATION_TOKENS,
               "seconds": round(time.perf_counter() - start, 1),
               **bench.score(model, PROMPTS)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    scope = f"first {args.max_tokens} tokens of each validation split" if args.max_tokens else "full validation splits"
    text = "\n".join([
        f"# --size {fraction:g} on the bundled {args.model} model ({scope})", "",
        (f"Every shape of the grid ({experts} experts of {width} neurons at the start), default recipe; the probe "
         f"errors are --size's ({probe_seconds:.0f} s for all probes, closed-form recipe on "
         f"{record['probe_blocks']} calibration blocks). Bold: the shape --size {fraction:g} chose."
         + (" Only that shape was compressed in this run (`--only-chosen`); the other rows come from an earlier "
            "run, with the calibration tokens of its default." if args.only_chosen else "")), "",
        table(rows, original, record["chosen"], fraction), "",
        f"Whole benchmark: {(time.perf_counter() - begin) / 60:.1f} min on {torch.get_num_threads()} threads."])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"original": original, "size": record, "rows": rows,
                                                      "probe_seconds": round(probe_seconds, 1)}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
