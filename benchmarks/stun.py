"""STUN's claim on the bundled models: at 40% total sparsity of the routed experts' weights, expert pruning
then unstructured pruning (STUN) beats unstructured pruning alone; and the default recipe at the same
parameter count, which removes experts only (no engine stores the zeros of unstructured pruning).

Rows (full validation splits, as benchmarks.quality): OWL-Wanda at 40% with every expert kept; STUN's expert
stage at 80% of the experts then OWL-Wanda on the rest to 40% in all (as published, and with the default's
closed-form fits); the default recipe keeping 60% of the experts (the same count of nonzero routed weights).

    python -m benchmarks.stun [--model reference|qwen2-moe] [--threads 1]   # writes benchmarks/results/stun-<model>.{md,json}
"""

from __future__ import annotations

import json
import time

from benchmarks.quality import CLOSED_FORM_FITS, RESULTS, model_bench, table

TOTAL = 0.4  # STUN's headline sparsity of the routed experts


def rows(experts: int) -> list[tuple[str, int, dict]]:
    """(label, experts kept, compress() options) at TOTAL sparsity of the routed-expert weights."""
    stun_k = round(0.8 * experts)
    unstructured = round(1 - (1 - TOTAL) * experts / stun_k, 4)  # the rest of the budget, after 20% of the experts
    default_k = round((1 - TOTAL) * experts)
    return [
        (f"OWL-Wanda alone, {TOTAL:.0%} of every expert's weights", experts,
         {"method": "reap", "sparsity": TOTAL}),
        (f"STUN: {stun_k} experts, then OWL-Wanda {unstructured:.1%}", stun_k,
         {"method": "stun", "sparsity": unstructured}),
        (f"STUN + fits: {stun_k} experts, fitted, then OWL-Wanda {unstructured:.1%}", stun_k,
         {"method": "stun", "sparsity": unstructured} | CLOSED_FORM_FITS),
        (f"**default**: {default_k} experts ({1 - default_k / experts:.1%} of the weights), nothing zeroed", default_k, {}),
    ]


def main() -> None:
    begin = time.perf_counter()
    args, bench, original = model_bench(__doc__, shared_stats=True)  # STUN as published re-plans from them
    measured = [bench.row(label, k, options, 0) for label, k, options in rows(bench.experts)]
    scope = f"first {args.max_tokens} tokens of each validation split" if args.max_tokens else "full validation splits"
    text = "\n".join([f"# STUN's claim on the bundled {args.model} model ({scope})", "",
                      table([original] + measured, original), "",
                      f"{(time.perf_counter() - begin) / 60:.1f} min on {args.threads} threads."])
    stem = f"stun-{args.model}" + ("-quick" if args.max_tokens else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"original": original, "rows": measured}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
