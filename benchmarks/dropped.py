"""Ideas measured on the way to the default and dropped, and the refit's need for tokens: the reference model
at 16 of 32 experts, held-out train text (as benchmarks/choices.py), 32,768 calibration tokens unless a row
says otherwise.

    python -m benchmarks.dropped   # writes benchmarks/results/dropped.md and .json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers.utils import logging

from benchmarks.choices import MAX_TOKENS, RESULTS, mean, texts
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.checkpoints.loading import REFERENCE_MODEL, load_model, load_tokenizer
from hcsmoe.pipeline import compress
from hcsmoe.fitting.refit import RefitOptions
from hcsmoe.fitting.router_fit import RouterFitOptions

EXPERTS = 16
BLOCKS = 128  # 128 blocks of the reference model's 256-token context: 32,768 tokens
GREEDY_4 = {"method": "ream", "group_size": 4}
ROWS: list[tuple[str, dict]] = [
    ("reap + refit", {"method": "reap", "refit": True}),
    ("reap + router fit absorbing dropped experts' mass + refit",
     {"method": "reap", "refit": True, "router_fit": RouterFitOptions(absorb=True)}),
    ("reap + refit, blockwise solver (Gauss-Seidel, 4 sweeps)",
     {"method": "reap", "refit": RefitOptions(solver="blockwise")}),
    ("ream as published + refit", {"method": "ream", "refit": True}),
    ("ream, greedy groups of up to 4, aligned merge + refit", GREEDY_4 | {"refit": True}),
    ("ream, greedy groups of up to 4, neuron selection by output energy + refit", GREEDY_4 | {"merge": "select-energy", "refit": True}),
    ("hc-smoe + refit", {"method": "hc-smoe", "refit": True}),
    ("hc-smoe + router fit + refit", {"method": "hc-smoe", "refit": True, "router_fit": True}),
    ("reap + refit, 8,192 calibration tokens", {"method": "reap", "refit": True, "num_blocks": 32}),
    ("reap + refit, 65,536 calibration tokens", {"method": "reap", "refit": True, "num_blocks": 256}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tokenizer, original = load_tokenizer(REFERENCE_MODEL), load_model(REFERENCE_MODEL)
    sources = texts()
    base = {name: m["ppl"] for name, m in evaluate(original, tokenizer, texts=sources, max_tokens=MAX_TOKENS)["languages"].items()}
    rows = []
    for label, options in ROWS:
        options = {"num_blocks": BLOCKS} | options
        result = compress(original, tokenizer=tokenizer, num_experts=EXPERTS, progress=False, **options)
        scores = evaluate(result.model.float(), tokenizer, texts=sources, max_tokens=MAX_TOKENS)["languages"]
        rows.append({"setting": label, **{name: round(m["ppl"] / base[name], 4) for name, m in scores.items()}})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| setting | mean (train, held out) | mean (validation) |", "|---|---|---|"]
    lines += [f"| {r['setting']} | {mean(r, 'train'):.4f} | {mean(r, 'validation'):.4f} |" for r in rows]
    seconds = time.perf_counter() - start
    text = (f"Reference model, {EXPERTS} of 32 experts; perplexity ratio to the original, mean over en/fr/es, on the "
            f"first {MAX_TOKENS} tokens of each text.\n\n" + "\n".join(lines)
            + f"\n\nWhole benchmark: {seconds / 60:.1f} min on {torch.get_num_threads()} threads.\n")
    (RESULTS / "dropped.json").write_text(json.dumps({"rows": rows, "seconds": round(seconds, 1)}, indent=1) + "\n")
    (RESULTS / "dropped.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
