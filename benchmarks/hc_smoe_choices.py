"""Three choices for HC-SMoE as published (`--method hc-smoe`), measured on the reference model with 32
calibration blocks: calibration text, sequential calibration, and a cap on group size.

- calibration text: English train text (the paper's setting) vs English, French and Spanish train text
  interleaved (the languages the model serves);
- sequential: each layer calibrated on the outputs of the already-compressed layers before it (vs the
  original model's inputs, as in the paper);
- --max-group-size: average linkage chains one large group per layer; does forbidding that help?

Choices are made on held-out *train* slices (the last articles of each language's train split, which the
calibration blocks never reach); validation numbers are reported beside them, never used to choose.

    python -m benchmarks.hc_smoe_choices   # writes benchmarks/results/hc-smoe-choices.md and .json
"""

from __future__ import annotations

import json
import time

import torch
from transformers.utils import logging

from benchmarks.choices import HELD_OUT_ARTICLES, MAX_TOKENS, RESULTS, texts
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.checkpoints.loading import REFERENCE_MODEL, load_model, load_tokenizer
from hcsmoe.pipeline import compress

CALIBRATIONS = ("wiki:en", "wiki:en,fr,es")
GROUP_SIZE_CAPS = (3, 6)
RANDOM_SEEDS = (0, 1, 2)
HC_SMOE = {"method": "hc-smoe", "num_blocks": 32, "progress": False}  # as published, with the 8,192 tokens measured


def scores(model, tokenizer, original, sources) -> dict:
    result = evaluate(model.float(), tokenizer, reference=original, texts=sources, max_tokens=MAX_TOKENS)
    return {name: round(m["ppl"], 2) for name, m in result["languages"].items()}


def mean_of(rows: list[dict]) -> dict:
    return {key: round(sum(r[key] for r in rows) / len(rows), 2) for key in rows[0]}


def main() -> None:
    logging.set_verbosity_error()
    torch.set_num_threads(2)
    start = time.perf_counter()
    tokenizer, original = load_tokenizer(REFERENCE_MODEL), load_model(REFERENCE_MODEL)
    sources = texts("train-slice")
    rows = [{"experts": 32, "setting": "original", **scores(original, tokenizer, original, sources)}]
    e = original.config.num_experts
    for k in (e * 3 // 4, e // 2):
        for calibration in CALIBRATIONS:
            for sequential in (False, True):
                result = compress(REFERENCE_MODEL, num_experts=k, calibration=calibration, sequential=sequential,
                                  **HC_SMOE)
                label = f"hc-smoe, {calibration} calibration, {'sequential' if sequential else 'original inputs'}"
                rows.append({"experts": k, "setting": label, **scores(result.model, tokenizer, original, sources)})
                print(json.dumps(rows[-1]), flush=True)
        for cap in GROUP_SIZE_CAPS:
            result = compress(REFERENCE_MODEL, num_experts=k, max_group_size=cap, **HC_SMOE)
            label = f"hc-smoe, default calibration, at most {cap} experts per group"
            rows.append({"experts": k, "setting": label, **scores(result.model, tokenizer, original, sources)})
            print(json.dumps(rows[-1]), flush=True)
        randoms = [scores(compress(REFERENCE_MODEL, num_experts=k, method="random", seed=s, num_blocks=32,
                                   progress=False).model,
                          tokenizer, original, sources) for s in RANDOM_SEEDS]
        rows.append({"experts": k, "setting": f"random pruning (mean of {len(RANDOM_SEEDS)} seeds)", **mean_of(randoms)})
        print(json.dumps(rows[-1]), flush=True)
    write(rows, time.perf_counter() - start)


def write(rows: list[dict], seconds: float) -> None:
    columns = [c for c in rows[0] if c not in ("experts", "setting")]
    lines = ["| experts | setting | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    lines += [f"| {r['experts']} | {r['setting']} | " + " | ".join(f"{r[c]:.2f}" for c in columns) + " |" for r in rows]
    text = (f"Perplexity on the first {MAX_TOKENS} tokens of each text; train slices = last {HELD_OUT_ARTICLES} "
            f"train articles per language (used to choose), validation reported only.\n\n" + "\n".join(lines)
            + f"\n\nWhole benchmark: {seconds / 60:.1f} min on {torch.get_num_threads()} threads.\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hc-smoe-choices.json").write_text(json.dumps({"rows": rows, "seconds": round(seconds, 1)}, indent=1) + "\n")
    (RESULTS / "hc-smoe-choices.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
