"""The README's results tables, read from benchmarks/results/quality-<model>.json (run benchmarks.quality first;
quality-<model>-quick.json, the --quick rows, where the whole table has not been run) and, for the default (--size F), size-<model>[-F].json (benchmarks.size).

One table per model: for each size, the original, the default, and every method as published and with the
fitting stages; the mean perplexity ratio over en/fr/es to the original, mean KL and top-1 agreement against
the original, and (at 50% removed) the mean matching prefix of greedy continuations. The best compressed value
of each column at each size is bold.

    python -m benchmarks.headline            # prints markdown
    python -m benchmarks.headline --readme   # the README's rows only, both sizes in one table per model
                                             # (bold: best of every row measured at that size)
"""

from __future__ import annotations

import json
import math

from benchmarks.quality import RESULTS
from hcsmoe.calibration.text import LANGUAGES
from hcsmoe.checkpoints.loading import BUNDLED_MODELS, load_config
from hcsmoe.recipe import Recipe
from hcsmoe.sizing import config_shapes, model_shape

MODELS = {"reference": "reference Qwen3-MoE (32 experts)", "qwen2-moe": "Qwen2-MoE (60 experts + shared expert)",
          "deepseek-v3": "DeepSeek-V3 routing (32 experts in 4 groups, sigmoid + bias, shared expert)"}
COLUMNS = [(f"{lang} ppl", f"{lang}/ppl", min) for lang in LANGUAGES] + [
    ("mean ratio", "ratio", min), ("KL (mean)", "kl", min), ("top-1 (mean)", "top1", max),
    ("gen prefix (mean)", "gen_prefix", max)]


def mean_of(row: dict, key: str) -> float:
    values = [row.get(f"{lang}/{key}") for lang in LANGUAGES]
    return math.nan if None in values else sum(values) / len(values)


def cells_of(row: dict, original: dict) -> dict:
    """Every column's value for one row (nan where the row has no such measure)."""
    cells = {key: row[key] for _, key, _ in COLUMNS[: len(LANGUAGES)]}
    cells["ratio"] = sum(row[f"{l}/ppl"] / original[f"{l}/ppl"] for l in LANGUAGES) / len(LANGUAGES)
    for key in ("kl", "top1", "gen_prefix"):
        cells[key] = mean_of(row, key)
    return cells


# The README's rows: the default (--size F), the default recipe at the count F*E of whole experts, --fast and the
# best expert-fit setting measured, the best published method (REAP) and HC-SMoE as published, each with and
# without the fits.
SIZE_LABEL = "**default** (--size {fraction:g})"
DISTILL_LABEL = "default + end-to-end stage, opt-in (--size {fraction:g} --distill-steps {steps})"
README_ROWS = ("**default** (--size 0.5)", "**default** (--size 0.75)", *(DISTILL_LABEL.format(fraction=f, steps=200)
                                                                       for f in (0.5, 0.75)), "**default**",
               "default --fast (closed form, no expert fit)",
               "default, expert fit with plain steps (--refit-steps 100 --no-refit-whiten)", "reap as published", "reap + fits",
               "reap + fits + expert fit", "hc-smoe as published", "hc-smoe + fits", "hc-smoe + fits + expert fit")
# Shorter names for the README's narrow tables.
README_LABELS = {"**default**": "default recipe, whole experts (-k)",
                 "default --fast (closed form, no expert fit)": "default --fast (closed form)",
                 "default, expert fit with plain steps (--refit-steps 100 --no-refit-whiten)":
                     "default, 100 plain steps (--refit-steps 100 --no-refit-whiten)"}


def size_table(rows: list[dict], shown: tuple[str, ...] | None = None, every_column: bool = False) -> list[str]:
    """One size's table; `shown`: only these rows (in this order), the best of each column still over all;
    `every_column`: keep the columns no row measured (a dash), so that sizes line up."""
    original = next(r for r in rows if r["method"] == "original")
    compressed = [r for r in rows if r["method"] != "original"]
    values = [cells_of(r, original) for r in compressed]
    columns = [c for c in COLUMNS if every_column or not all(math.isnan(v[c[1]]) for v in values)]
    best = {key: pick((v[key] for v in values if not math.isnan(v[key])), default=math.nan) for _, key, pick in columns}
    digits = {"ratio": 3, "kl": 3, "top1": 3, "gen_prefix": 1}
    lines = [f"| {'experts × neurons' if 'shape' in original else 'experts'} | method | " + " | ".join(name for name, _, _ in columns) + " |",
             "|" + "---|" * (len(columns) + 2)]
    shown_only = shown is not None
    if shown_only:
        order = {label: i for i, label in enumerate(shown)}
        kept = sorted((i for i, r in enumerate(compressed) if r["method"] in order),
                      key=lambda i: order[compressed[i]["method"]])
        compressed, values = [compressed[i] for i in kept], [values[i] for i in kept]
    lines.append(f"| {original.get('shape', original['experts'])} | original | " + " | ".join(
        f"{original[key]:.2f}" if key in original else ("1.000" if key == "ratio" else "–")
        for _, key, _ in columns) + " |")
    for row, cell in zip(compressed, values):
        shown = []
        for _, key, _ in columns:
            text = "–" if math.isnan(cell[key]) else f"{cell[key]:.{digits.get(key, 2)}f}"
            shown.append(f"**{text}**" if cell[key] == best[key] else text)
        label = readme_label(row) if shown_only else row["method"]
        lines.append(f"| {row.get('shape', row['experts'])} | {label.replace('**', '')} | " + " | ".join(shown) + " |")
    return lines


def with_sizes(model: str, rows: list[dict]) -> list[dict]:
    """One size's rows with --size's chosen shape at that size (from benchmarks.size, when it was run), every row
    labelled by its shape (experts x neurons)."""
    original = next(r for r in rows if r["method"] == "original")
    kept = next(r["experts"] for r in rows if r["method"] != "original")
    width = None
    sized = []
    for path in sorted(RESULTS.glob(f"size-{model}*.json")):
        if path.stem.endswith("-quick"):
            continue
        report = json.loads(path.read_text())
        record = report["size"]
        width = record["neurons"]
        if round(record["fraction"] * record["experts"]) != kept:
            continue
        chosen = next(r for r in report["rows"] if (r["experts"], r["width"]) == (record["chosen"]["experts"],
                                                                                  record["chosen"]["width"]))
        sized.append({**chosen, "method": SIZE_LABEL.format(fraction=record["fraction"]),
                      "shape": f"{chosen['experts']} × {chosen['width']}"})
        sized += distilled_rows(model, record["fraction"])
    if not sized:
        rows = default_by_size(model, rows, kept)
    if width is None:
        return rows
    shaped = [{**r, "shape": f"{r['experts']} × {width}"} for r in rows]
    return [shaped[0], *sized, *shaped[1:]]


def distilled_rows(model: str, fraction: float) -> list[dict]:
    """The default at --size `fraction` with the opt-in end-to-end stage (benchmarks.distill), when it was run."""
    path = RESULTS / f"distill-{model}.json"
    if not path.exists():
        return []
    rows = [r for r in json.loads(path.read_text())["rows"] if r["fraction"] == fraction and "distill" in r]
    return [{**r, "method": DISTILL_LABEL.format(fraction=fraction, steps=r["distill"]["options"]["steps"]),
             "shape": f"{r['experts']} × {r['width']}"} for r in rows]


def readme_label(row: dict) -> str:
    """A row's name in the README: shorter for some, and an end-to-end row says where the stage kept nothing."""
    label = README_LABELS.get(row["method"], row["method"])
    if row.get("distill", {}).get("fallback"):
        label += ": no check improved, the default's weights kept"
    return label


def default_by_size(model: str, rows: list[dict], kept: int) -> list[dict]:
    """Where --size F's grid has one shape, K = F*E whole experts (experts that cannot narrow, or DeepSeek at 0.75,
    whose widths must divide its shared expert's), the default recipe's row at K is the default itself (the same
    bits, tests/test_size.py), labelled as such."""
    config = load_config(BUNDLED_MODELS[model])
    experts, width, _ = model_shape(config)
    fraction = kept / experts
    if width is not None and config_shapes(config, Recipe(), fraction) != [(kept, width)]:
        return rows
    return [{**r, "method": SIZE_LABEL.format(fraction=fraction)} if r["method"] == "**default**" else r for r in rows]


def main() -> None:
    import sys

    shown = README_ROWS if "--readme" in sys.argv[1:] else None
    for name, title in MODELS.items():
        path = next((p for p in (RESULTS / f"quality-{name}.json", RESULTS / f"quality-{name}-quick.json") if p.exists()),
                    None)
        if path is None:
            continue
        report = json.loads(path.read_text())
        print(f"**{title}**, full validation splits (`benchmarks/results/{path.stem}.md`):\n")
        if shown is None:
            for k, rows in report["sizes"].items():
                print("\n".join(size_table(rows, shown)) + "\n")
            continue
        tables = [size_table(with_sizes(name, rows), shown, every_column=True) for rows in report["sizes"].values()]
        print("\n".join(tables[0] + [line for table in tables[1:] for line in table[3:]]) + "\n")  # one header


if __name__ == "__main__":
    main()
