"""MC-SMoE's compress stage as published, beside narrower experts at the same parameter count (issue 25, item 3).

MC-SMoE (Li et al., ICLR 2024) merges experts (M-SMoE, `--method m-smoe`), then compresses each merged expert
with LoSparse: every weight matrix W (out x in) becomes L R + S, L = U sqrt(Sigma) and R = sqrt(Sigma) V^T
from a truncated SVD of rank 32 (its scripts' `low_rank_factor`), S the residual, pruned row by row to 10% of its
rows (`final_threshold` 0.10, `structured_direction='row'`) by the first-order importance |S * dLoss/dW| (PLATON's
|theta * grad|; the gradient of W and of S are the same), summed over calibration batches (the zero-shot,
gradient-only variant of its scripts: no fine-tuning; the EMA over steps becomes a sum, as nothing trains).
The LM loss is taken on the default calibration text (train split). The model is evaluated dense, in memory,
with its true parameter count: no engine loads low-rank or sparse experts, so this is a table row, not an
output format.

Rows at E/2 experts: M-SMoE as published; M-SMoE + LoSparse; the default recipe at the same routed-expert
parameter count (`--width` chosen so K x I2 neurons hold at most LoSparse's count, I2 a multiple of 8 as --width
rounds); the default at E/2 experts of I.

    python -m benchmarks.mcsmoe [--model qwen2-moe] [--threads 1]   # writes benchmarks/results/mcsmoe-<model>.{md,json}
"""

from __future__ import annotations

import json
import math
import time

import torch

from benchmarks.quality import PROMPTS, RESULTS, model_bench, ratio
from benchmarks.size import mean
from hcsmoe.apply.narrow import WIDTH_MULTIPLE
from hcsmoe.calibration.text import LANGUAGES, calibration_blocks
from hcsmoe.checkpoints.architectures import architecture_for, moe_layers
from hcsmoe.pipeline import compress
from hcsmoe.recipe import DEFAULT_CALIBRATION

RANK = 32  # MC-SMoE's low_rank_factor
KEPT_ROWS = 0.10  # MC-SMoE's final_threshold: the share of S's rows kept
GRADIENT_TOKENS = 16384  # calibration tokens of the importance pass (the zero-shot script: 512 samples)


def expert_matrices(experts, e: int) -> dict[str, torch.Tensor]:
    """Expert e's gate, up ([I, H]) and down ([H, I]) of a fused [gate; up] layout (both bundled models)."""
    width = experts.down_proj.shape[2]
    return {"gate": experts.gate_up_proj[e, :width], "up": experts.gate_up_proj[e, width:],
            "down": experts.down_proj[e]}


def gradients(model, tokenizer, batch_size: int = 4) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per MoE layer, the LM loss's gradients of gate_up_proj and down_proj on the calibration text, one list
    entry per batch (the importance sums |S * G| over batches, as PLATON's score accumulates over steps)."""
    architecture = architecture_for(model.config)
    layers = moe_layers(model, architecture)
    context = int(model.config.max_position_embeddings)
    blocks = calibration_blocks(tokenizer, DEFAULT_CALIBRATION, math.ceil(GRADIENT_TOKENS / context), context,
                                context)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        layer.experts.gate_up_proj.requires_grad_(True)
        layer.experts.down_proj.requires_grad_(True)
    batches = {layer.index: [] for layer in layers}
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start:start + batch_size]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for layer in layers:
            batches[layer.index].append((layer.experts.gate_up_proj.grad.clone(), layer.experts.down_proj.grad.clone()))
            layer.experts.gate_up_proj.grad = None
            layer.experts.down_proj.grad = None
    for layer in layers:
        layer.experts.gate_up_proj.requires_grad_(False)
        layer.experts.down_proj.requires_grad_(False)
    return batches


def losparse(weight: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """W -> L R + S with S's rows pruned to KEPT_ROWS by summed |S * G|; the dense result and its parameters."""
    u, sigma, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    rank = min(RANK, sigma.numel())
    low = (u[:, :rank] * sigma[:rank]) @ vh[:rank]  # L R with L = U sqrt(S), R = sqrt(S) V^T
    residual = weight.double() - low
    importance = sum((residual * g.double()).abs() for g in grads).sum(dim=1)
    rows = max(1, math.ceil(KEPT_ROWS * weight.shape[0]))
    kept = torch.zeros(weight.shape[0], dtype=torch.bool)
    kept[importance.topk(rows).indices] = True
    result = low + residual * kept.unsqueeze(1)
    return result.to(weight.dtype), rank * sum(weight.shape) + rows * weight.shape[1]


def compress_experts(model, batches: dict) -> tuple[int, int]:
    """LoSparse on every routed expert of `model` in place; (parameters after, dense parameters before)."""
    after = before = 0
    for layer in moe_layers(model, architecture_for(model.config)):
        experts, width = layer.experts, layer.experts.down_proj.shape[2]
        with torch.no_grad():
            for e in range(layer.num_experts):
                grads = {"gate": [g[e, :width] for g, _ in batches[layer.index]],
                         "up": [g[e, width:] for g, _ in batches[layer.index]],
                         "down": [d[e] for _, d in batches[layer.index]]}
                for name, weight in expert_matrices(experts, e).items():
                    compressed, count = losparse(weight, grads[name])
                    weight.copy_(compressed)
                    after, before = after + count, before + weight.numel()
    return after, before


def main() -> None:
    begin = time.perf_counter()
    args, bench, original = model_bench(__doc__)
    experts = bench.experts
    k = experts // 2
    rows = []

    def scored(label: str, model, start: float, share: float) -> None:
        row = {"method": label, "routed_parameters": round(share, 4), "seconds": round(time.perf_counter() - start, 1),
               **bench.score(model, PROMPTS)}
        print(json.dumps(row), flush=True)
        rows.append(row)

    start = time.perf_counter()
    merged = compress(bench.original, tokenizer=bench.tokenizer, num_experts=k, method="m-smoe", progress=False).model
    scored("M-SMoE as published", merged, start, k / experts)
    start = time.perf_counter()
    merged = merged.float()
    after, before = compress_experts(merged, gradients(merged, bench.tokenizer))
    share = k / experts * after / before
    scored(f"M-SMoE + LoSparse (rank {RANK}, {KEPT_ROWS:.0%} of S's rows)", merged, start, share)
    width = moe_layers(bench.original, architecture_for(bench.original.config))[0].experts.down_proj.shape[2]
    neurons = math.floor(share * experts * width / k) // WIDTH_MULTIPLE * WIDTH_MULTIPLE  # as --width rounds
    start = time.perf_counter()
    model = compress(bench.original, tokenizer=bench.tokenizer, num_experts=k, width=neurons, progress=False).model
    scored(f"default, -k {k} --width {neurons} (at most LoSparse's parameters)", model, start, k * neurons / (experts * width))
    start = time.perf_counter()
    model = compress(bench.original, tokenizer=bench.tokenizer, num_experts=k, progress=False).model
    scored(f"default, -k {k}", model, start, k / experts)

    head = ("| method | routed parameters kept | " + " | ".join(f"{lang} ppl" for lang in LANGUAGES)
            + " | mean ratio | mean KL | top-1 (mean) | gen prefix (mean) | s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['method']} | {r['routed_parameters']:.3f} | "
                     + " | ".join(f"{r[f'{lang}/ppl']:.2f}" for lang in LANGUAGES)
                     + f" | {ratio(r, original):.4f} | {mean(r, 'kl'):.4f} | {mean(r, 'top1'):.3f} | "
                     f"{mean(r, 'gen_prefix'):.2f} | {r['seconds']:.0f} |")
    scope = f"first {args.max_tokens} tokens of each validation split" if args.max_tokens else "full validation splits"
    text = "\n".join([f"# MC-SMoE's compress stage on the bundled {args.model} model ({scope})", "",
                      (f"{experts} -> {k} experts. Routed parameters kept: of the original routed experts' "
                       "weights, LoSparse's counted as rank x (out + in) + kept rows x in per matrix."), "",
                      "\n".join(lines), "",
                      f"Whole benchmark: {(time.perf_counter() - begin) / 60:.1f} min on {torch.get_num_threads()} threads."])
    stem = f"mcsmoe-{args.model}" + ("-quick" if args.max_tokens else "")
    (RESULTS / f"{stem}.md").write_text(text + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"original": original, "rows": rows}, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
