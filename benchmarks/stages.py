"""Where a compression's time goes: each stage's wall time against the arithmetic it needs, on one real-shaped
MoE layer streamed from a synthetic checkpoint (random bf16 weights, as benchmarks.streaming writes them).

    python -m benchmarks.stages --shape qwen3-30b-a3b    # 128 experts of 768 on hidden 2048, top-8
    python -m benchmarks.stages --shape mixtral-8x7b     # 8 experts of 14,336 on hidden 4096, top-2 (hours)
    python -m benchmarks.stages --shape all --tokens 4096 --block-size 512 --expert-fit-steps 3   # the defaults
    python -m benchmarks.stages --shape tiny --tokens 512 --out /tmp/stages   # a quick check (and tiny-mixtral)

Per stage (hcsmoe/timing.py's counters): wall time; floating-point operations counted from the shapes, token
counts and what the run's fits recorded (each formula printed); the time that arithmetic takes at this machine's
torch.matmul rate, measured in the same run on each term's product shape; the ratio. float64 terms are priced at
the float64 rate and also (as the issue asks) at the float32 rate, which puts them at >= ~2x by construction.
The fits' reports are recorded by wrapping the functions the stages call (same arguments, same results). The
expert fit runs --expert-fit-steps L-BFGS steps, extrapolated to the default 30 from its cost per evaluation.
Whole models at the default's calibration tokens (131,072 in blocks of 2048): every term recounted at those token counts (with the code's caps),
each stage's measured wall/arithmetic kept. Writes <out>/stages.json (a shape's entry replaced) and stages.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
import timeit
from collections import namedtuple
from contextlib import ExitStack, contextmanager
from pathlib import Path
from unittest import mock

import torch

from hcsmoe.calibration.text import CALIBRATION_TOKENS

RESULTS = Path(__file__).parent / "results"
FULL_TOKENS, FULL_BLOCK, FULL_STEPS = CALIBRATION_TOKENS, 2048, 30  # the default recipe's calibration and expert fit
ROUTER_INPUTS, ROUTER_FIT_TOKENS, FIT_CHUNK = 8192, 16384, 8192  # the code's caps (statistics, router fit, expert fit)
DTYPES = {"f32": torch.float32, "f64": torch.float64}
TOTAL = "total (default recipe, every stage)"
PARTS = ("expert fit: setup", "expert fit: L-BFGS", "expert fit: one evaluation")


def shape_config(name: str):
    """(one-layer config, MoE layers of the whole model) of a named shape; the tiny ones check the script."""
    from transformers import MixtralConfig, Qwen3MoeConfig

    from benchmarks.streaming import QWEN3_SHAPES

    common = {"num_hidden_layers": 1, "dtype": "bfloat16", "tie_word_embeddings": False,
              "max_position_embeddings": 4096}
    mixtral = {"num_experts_per_tok": 2, "num_local_experts": 8, **common}
    tiny_qwen3 = {"hidden_size": 128, "moe_intermediate_size": 64, "num_experts": 16, "num_experts_per_tok": 4,
                  "head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256,
                  "vocab_size": 8192}
    return {"qwen3-30b-a3b": lambda: (Qwen3MoeConfig(**{**QWEN3_SHAPES, **common}), 48),
            "mixtral-8x7b": lambda: (MixtralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                                   num_key_value_heads=8, vocab_size=32768, **mixtral), 32),
            "tiny": lambda: (Qwen3MoeConfig(**tiny_qwen3, **common), 48),
            # K*I = 6400 > 6144: the blockwise refit and the selection's rounds, as at real shapes
            "tiny-mixtral": lambda: (MixtralConfig(hidden_size=128, intermediate_size=1600, num_attention_heads=4,
                                                   num_key_value_heads=2, vocab_size=8192, **mixtral), 32)}[name]()


# experts E, kept K (half: the default ratio), top-k, hidden H, expert width I; attention heads, kv heads, head dim
Dims = namedtuple("Dims", "E K k H I heads kv hd")


def dims_of(c) -> Dims:
    e = getattr(c, "num_experts", None) or c.num_local_experts
    return Dims(e, e // 2, c.num_experts_per_tok, c.hidden_size, getattr(c, "moe_intermediate_size", None)
                or c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
                getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)


# one part of a stage's arithmetic: its formula, its FLOPs, "f32" or "f64", and the (m, k, n) product that prices it
Term = namedtuple("Term", "what flops dtype shape")


class Rates:
    """torch.matmul GFLOP/s per (dtype, m, k, n): best of 3 after a warm-up, small products repeated to 0.2 GFLOP;
    a product over the budget is measured with its largest dimension halved until it fits (the rate has saturated)."""

    def __init__(self):
        self.budget, self.measured = {"f32": 2e10, "f64": 5e9}, {}

    def __call__(self, dtype: str, shape: tuple) -> float:
        m, k, n = (max(1, int(v)) for v in shape)
        while 2 * m * k * n > self.budget[dtype] and max(m, k, n) > 256:
            m, k, n = ((v // 2 if v == max(m, k, n) else v) for v in (m, k, n))
        key = f"{dtype} [{m},{k}]x[{k},{n}]"
        if key not in self.measured:
            a, b = (torch.randn(*s, dtype=DTYPES[dtype]) for s in ((m, k), (k, n)))
            repeats = max(1, int(2e8 // (2 * m * k * n)))
            torch.matmul(a, b)
            best = min(timeit.repeat(lambda: torch.matmul(a, b), number=repeats, repeat=3))
            self.measured[key] = 2 * m * k * n * repeats / best / 1e9
        return self.measured[key]


@contextmanager
def recording():
    """What every fit was asked and reported, and how long each neuron selection and L-BFGS run took: the
    functions the stages call are wrapped (same arguments, same results) while the run lasts."""
    from hcsmoe.apply import neurons
    from hcsmoe.fitting import choice, stage

    log = {key: [] for key in ("router fit", "refit", "expert fit", "choice", "merges", "lbfgs")}
    experts = lambda moe: int(moe.experts.down_proj.shape[0])

    def wrapped(original, key, note):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            log[key].append(note(args, out, time.perf_counter() - start))
            return out
        return call

    patches = [(stage, "fit_router", "router fit", lambda a, out, s: {**out, "K": len(a[2].groups)}),
               (stage, "refit_layer", "refit", lambda a, out, s: {**out, "K": experts(a[0])}),
               (stage, "fit_experts", "expert fit", lambda a, out, s: {**out, "K": experts(a[0])}),
               (choice, "routed_output", "choice", lambda a, out, s: {"tokens": len(a[2]), "K": experts(a[0])}),
               (torch.optim.LBFGS, "step", "lbfgs", lambda a, out, s: {
                   "dtype": str(a[0]._params[0].dtype), "seconds": s,
                   "evaluations": a[0].state[a[0]._params[0]]["func_evals"]})]
    select = wrapped(neurons.NEURON_MERGES["select"], "merges",
                     lambda a, out, s: {"members": list(a[2].members), "top_k": a[4], "seconds": s})
    with ExitStack() as stack:
        stack.enter_context(mock.patch.dict(neurons.NEURON_MERGES, {"select": select}))
        for owner, name, key, note in patches:
            stack.enter_context(mock.patch.object(owner, name, wrapped(getattr(owner, name), key, note)))
        yield log


def selected_tokens(stats, merges: list[dict]) -> list[int]:
    """Per neuron selection, the inputs it fitted on (apply/neurons.routed_gates: those of the first ROUTER_INPUTS
    calibration inputs that the original router sent to a member; all of them if fewer than two)."""
    if not merges:
        return []
    x = stats.router_inputs
    chosen = (x @ stats.router_weight.T).topk(merges[0]["top_k"], dim=-1).indices
    hits = [int(torch.isin(chosen, torch.tensor(m["members"])).any(-1).sum()) for m in merges]
    return [h if h >= 2 else x.shape[0] for h in hits]


def selection_rounds(n: int, width: int, hidden: int) -> float:
    """FLOPs of least_squares_subset's downdates from n candidates to `width`, each round as large as the code
    asks (approximate: a round may take fewer, skipping candidates that stand in for one already taken)."""
    flops, exact = 0.0, n <= 512  # EXACT_SELECTION
    while n > width:
        b = 1 if exact else max(1, (n - width) // 8)
        flops += 2 * n * n * b + 2 * n * b * hidden + 2 * b * b * n
        n -= b
    return flops


def stage_terms(d: Dims, rec: dict, tokens: int, block: int, scale: float = 1.0,
                steps_to: int | None = None) -> dict[str, list[Term]]:
    """Every stage's FLOPs as terms, from the run's records with every token count times `scale` (capped where the
    code caps it); `steps_to`: the expert fit's evaluations scaled from its recorded steps to that many."""
    T, L, E, K, k, H, I, F, D = tokens * scale, block, d.E, d.K, d.k, d.H, d.I, "f32", "f64"
    out = {"calibrate": [
        Term("6 layer runs (original, statistics and compressed streams, 2 passes each): attention projections "
             "2T·H·(2·heads+2·kv)·hd", 6 * 2 * T * H * (2 * d.heads + 2 * d.kv) * d.hd, F, (L, H, d.heads * d.hd)),
        Term("6 x attention scores 4T·L·heads·hd (the full L×L)", 6 * 4 * T * L * d.heads * d.hd, F, (L, d.hd, L)),
        Term("router logits 2T·H·(6E+3K) (6 layer runs, 3 routings)", 2 * T * H * (6 * E + 3 * K), F, (2048, H, E)),
        Term("statistics: every expert's gate/up on every token 4T·E·H·I, gated sums 2T·E·I",
             4 * T * E * H * I + 2 * T * E * I, F, (min(T, 2048), H, 2 * I)),
        Term("routed experts: original and compressed streams 2·6Tk·H·I, statistics stream's down 2Tk·I·H",
             14 * T * k * H * I, F, (T * k / E, H, 2 * I))]}
    cap = min(T, ROUTER_INPUTS) / min(tokens, ROUTER_INPUTS)
    merges = [(len(m["members"]), t * cap) for m, t in zip(rec["merges"], rec["selected_tokens"])]
    tg, n = sum(t for _, t in merges) / max(1, len(merges)), 2 * I  # n: candidates min(m·I, 2I), m >= 2
    inputs = min(T, ROUTER_INPUTS)  # N_r: the router inputs the statistics keep
    out["apply"] = [
        Term("select merge, per group: the original routing of the N_r router inputs, recomputed, 2N_r·H·E",
             len(merges) * 2 * inputs * H * E, F, (inputs, H, E)),
        Term("on the group's T_g routed inputs (m members): members' activations twice 2m·4T_g·H·I",
             sum(8 * m * t * H * I for m, t in merges), F, (tg, H, 2 * I)),
        Term("target 2m·T_g·I·H, Gram 2T_g·n², right side 2T_g·n·H (n = 2I candidates)",
             sum(2 * m * t * I * H + 2 * t * n * n + 2 * t * n * H for m, t in merges), D, (n, tg, n)),
        Term("Cholesky + inverse n³/3 + 2n³/3, readout 2n²·H", len(merges) * (n**3 + 2 * n * n * H), D, (n, n, n)),
        Term("downdates Σ over rounds 2n'²b + 2n'b·H (rounds simulated, approximate)",
             len(merges) * selection_rounds(n, I, H), D, (n, max(1, I // 8), n))] if merges else []
    out["router fit"] = []
    for r in (r for r in rec["router fit"] if "skipped" not in r):
        fit = round(T) - max(1, round(T) // 8)  # the choice fits on 7/8 of the tokens, the router fit on <= 16,384
        count = math.ceil(fit / max(1, fit // ROUTER_FIT_TOKENS)) if scale != 1 else r["tokens"]
        out["router fit"].append(Term(f"float64 L-BFGS 4·(evaluations + 1)·N·H·K, N = {count}, {r['evaluations']} "
                                      "evaluations", 4 * (r["evaluations"] + 1) * count * H * r["K"], D, (count, H, K)))
    out["refit"] = [t for r in rec["refit"] for t in refit_terms(d, r, r["tokens"] * scale)]
    th = sum(c["tokens"] for c in rec["choice"]) * scale  # held-out tokens, over the candidates
    out["choice"] = [Term("each candidate on T_h held-out tokens: routing 2T_h·H·K, gate/up 4T_h·k·H·I",
                          2 * th * H * K + 4 * th * k * H * I, F, (th * k / K / 2, H, 2 * I)),
                     Term("readout in float64 2T_h·k·I·H", 2 * th * k * I * H, D, (th * k / K / 2, I, H))]
    for r in rec["expert fit"]:
        setup, one = expert_fit_terms(d, r, r["tokens"] * scale)
        per_group = r["evaluations"] / r["groups"]
        if steps_to:  # L-BFGS stops at max_iter·5/4 evaluations
            per_group = min(steps_to * 5 // 4, round(steps_to * per_group / r["steps"]))
        out.setdefault(PARTS[0], []).extend(setup)
        out.setdefault(PARTS[1], []).extend(Term(f"{per_group:.3g} evaluations per group x ({t.what})",
                                                 t.flops * per_group, t.dtype, t.shape) for t in one)
        out.setdefault(PARTS[2], []).extend(Term(f"one group ({r['groups']} in the layer): {t.what}",
                                                 t.flops / r["groups"], t.dtype, t.shape) for t in one)
    return {stage: combined(terms) for stage, terms in out.items()}


def refit_terms(d: Dims, r: dict, tokens: float) -> list[Term]:
    """The refit's FLOPs (fitting/refit.py): joint, one (K·I)² system; blockwise, `sweeps` Gauss-Seidel sweeps."""
    K, H, I, te = r["K"], d.H, d.I, tokens * d.k  # te: Σ_e T_e, the routed (token, expert) pairs
    route = Term("routing 2T·H·K, features 4Σ_e T_e·H·I", 2 * tokens * H * K + 4 * te * H * I, "f32",
                 (te / K, H, 2 * I))
    if r["solver"] == "joint":
        n = K * I
        return [route, Term("Gram's upper block rows Σ_e 2T_e·I²·(K-e) ~ Σ_e T_e·I·(n+I), cross 2Σ_e T_e·I·H",
                            te * I * (n + I) + 2 * te * I * H, "f32", (I, te / K, n)),
                Term("Cholesky n³/3, solve 2n²·H, 2 errors 4n²·H (n = K·I)", n**3 / 3 + 6 * n * n * H, "f64",
                     (n, n, n))]
    s = r["sweeps"]
    return [Term(f"{s + 1} passes x ({route.what})", (s + 1) * route.flops, "f32", route.shape),
            Term(f"(1 + 3·{s}) x 2Σ_e T_e·I·H (predictions, right sides)", (1 + 3 * s) * 2 * te * I * H, "f64",
                 (te / K, I, H)),
            Term(f"{s} x Grams 2Σ_e T_e·I²", s * 2 * te * I * I, "f64", (I, te / K, I)),
            Term(f"{s} x K x (Cholesky I³/3 + solve 2I²·H)", s * K * (I**3 / 3 + 2 * I * I * H), "f64", (I, I, H))]


def expert_fit_terms(d: Dims, r: dict, tokens: float) -> tuple[list[Term], list[Term]]:
    """(setup, one evaluation of the whole layer) of the expert fit (fitting/expert_fit.py)."""
    K, H, I, te, groups = r["K"], d.H, d.I, tokens * d.k, r["groups"]
    reparam = K * (4 * I * H * H + 2 * H * I * I)  # W0 + D·P once per evaluation: 2·out·in² per weight
    one = [Term("experts forward 6Σ_e T_e·H·I + backward 8Σ_e T_e·H·I (no input gradient)", 14 * te * H * I,
                "f32", (te / K, H, 2 * I)),
           Term("whitened weights W0 + D·P once per evaluation, and the gradient's way back dW·P^T: "
                "2·K·(2·2I·H² + 2·H·I²)", 2 * reparam, "f32", (2 * I, H, H))]
    setup = [Term("4 balancing probes (forward + backward), error before and after (forward)",
                  4 * sum(t.flops for t in one) + 2 * (6 * te * H * I + reparam), "f32", (te / K, H, 2 * I)),
             Term("whitening features 4Σ_e T_e·H·I, covariances 2Σ_e T_e·(H² + I²), in groups the layer's residual "
                  "(every expert's output once, each group's before and after its fit) 3·6Σ_e T_e·H·I",
                  (4 + 18 * (groups > 1)) * te * H * I + 2 * te * (H * H + I * I),
                  "f32", (H, te / K, H)),
             Term("K x (Cholesky n³/3 + triangular inverse n³/3), n = H and I",
                  K * 2 * (H**3 + I**3) / 3, "f64", (H, H, H))]
    return setup, one


def combined(terms: list[Term]) -> list[Term]:
    """Terms of the same formula (e.g. one per refit call) added up, with their count."""
    same: dict[tuple[str, str], list[Term]] = {}
    for t in terms:
        same.setdefault((t.what, t.dtype), []).append(t)
    return [Term(what + (f" (x {len(ts)} calls)" if len(ts) > 1 else ""), sum(t.flops for t in ts), dtype,
                 ts[0].shape) for (what, dtype), ts in same.items() if any(t.flops for t in ts)]


def priced(terms: list[Term], rates: Rates) -> dict:
    """GFLOP per dtype; seconds of that arithmetic at the measured rates, and with every term at the f32 rate."""
    return {"gflop_f32": sum(t.flops for t in terms if t.dtype == "f32") / 1e9,
            "gflop_f64": sum(t.flops for t in terms if t.dtype == "f64") / 1e9,
            "arithmetic_s": sum(t.flops / rates(t.dtype, t.shape) / 1e9 for t in terms),
            "arithmetic_f32_s": sum(t.flops / rates("f32", t.shape) / 1e9 for t in terms)}


def run_shape(name: str, tokens: int, block: int, steps: int, rates: Rates) -> dict:
    """Stream-compress one synthetic layer of the shape with the default recipe: its stage table, extrapolated."""
    from benchmarks.streaming import write_synthetic_checkpoint
    from hcsmoe import timing
    from hcsmoe.fitting.refit import RefitOptions
    from hcsmoe.pipeline import Recipe, compress

    config, layers = shape_config(name)
    d, tokens = dims_of(config), tokens // block * block
    root = Path(tempfile.mkdtemp(prefix="hcsmoe-stages-", dir=os.environ.get("HCSMOE_BENCH_DIR")))
    try:
        size = write_synthetic_checkpoint(root / "source", 1, config=config)
        # -k K (half the experts) as the counts assume: the default recipe would run --size's probes first
        recipe = Recipe(experts=d.K, blocks=tokens // block, block_size=block, batch_size=1,
                        refit=RefitOptions(steps=steps))
        load = os.getloadavg()[0]
        timing.reset()
        with recording() as rec:
            start, cpu = time.perf_counter(), time.process_time()
            result = compress(root / "source", recipe, stream_to=root / "out", progress=False)
            total, cpu = time.perf_counter() - start, time.process_time() - cpu
        spent = timing.spent()
        rec["selected_tokens"] = selected_tokens(result.stats.layers[0], rec["merges"])
    finally:
        shutil.rmtree(root)
    terms = stage_terms(d, rec, tokens, block)
    fits = [r for r in rec["lbfgs"] if r["dtype"] == "torch.float32"]  # the expert fit's (the router fit's: float64)
    lbfgs, evaluations = sum(r["seconds"] for r in fits), sum(r["evaluations"] for r in fits)
    walls = spent | dict(zip(PARTS, (spent.get("expert fit", 0) - lbfgs, lbfgs, lbfgs / max(1, evaluations))))
    rows = {stage: {"wall_s": walls[stage], **priced(terms.get(stage, []), rates),
                    "how": [f"{t.what}: {t.flops / 1e9:.4g} GFLOP {t.dtype}" for t in terms.get(stage, [])]}
            for stage in [*spent, *(PARTS if "expert fit" in spent else ())]}
    if "expert fit" in spent:
        rows["expert fit"] |= priced([t for stage in PARTS[:2] for t in terms.get(stage, [])], rates)
        rows["expert fit"]["how"] = ["setup + L-BFGS, below"]
    rows[TOTAL] = {"wall_s": sum(spent.values()), "how": ["sum of the stages above"],
                   **{key: sum(rows[s][key] for s in spent) for key in priced([], rates)}}
    for row in rows.values():
        row["wall_over_s"] = row["wall_s"] / row["arithmetic_s"] if row["arithmetic_s"] else None
        row["wall_over_f32_s"] = row["wall_s"] / row["arithmetic_f32_s"] if row["arithmetic_s"] else None
    return {"shape": name, "dims": d._asdict(), "moe_layers": layers, "tokens": tokens, "block_size": block,
            "expert_fit_steps": steps, "threads": torch.get_num_threads(), "checkpoint_bytes": size,
            "load_average": [round(load, 2), round(os.getloadavg()[0], 2)], "compress_wall_s": total,
            "cpu_over_wall": cpu / total,
            "unstaged_s": total - sum(spent.values()), "choice": result.plan.layers[0].details.get("choice"),
            "stages": rows, "extrapolation": extrapolate(d, rec, tokens, layers, rows, rates), "records": rec}


def extrapolate(d: Dims, rec: dict, tokens: int, layers: int, rows: dict, rates: Rates) -> dict:
    """Whole model at FULL_TOKENS: every term recounted at those tokens, priced at the measured rates, times the
    stage's measured wall/arithmetic; stages without arithmetic (plan, write) as measured, per layer."""
    terms = stage_terms(d, rec, tokens, FULL_BLOCK, scale=FULL_TOKENS / tokens, steps_to=FULL_STEPS)
    out = {}
    for stage, row in rows.items():
        if stage not in (TOTAL, "expert fit", PARTS[2]):
            price = priced(terms.get(stage, []), rates)
            seconds = price["arithmetic_s"] * row["wall_over_s"] if price["arithmetic_s"] else row["wall_s"]
            out[stage] = {"tflop_f32": price["gflop_f32"] * layers / 1e3,
                          "tflop_f64": price["gflop_f64"] * layers / 1e3, "hours_here": seconds * layers / 3600}
    for recipe, left_out in (("default (30 whitened steps)", ()), ("--fast", PARTS)):
        out[f"total, {recipe}"] = {key: sum(v[key] for s, v in out.items() if s not in left_out and "total" not in s)
                                   for key in ("tflop_f32", "tflop_f64", "hours_here")}
    return out


HEADER = ("# Stage times against their arithmetic\n\nWritten by `python -m benchmarks.stages` (its docstring says "
          "how). Rates: torch.matmul in the same run on each term's product shape; float64 terms at the float64 rate "
          "(last column: at the float32 rate).\n")
STAGE_TABLE = ("| stage | wall s | GFLOP f32 + f64 | how counted | rate GFLOP/s | arithmetic s | wall / arithmetic "
               "| wall / arithmetic at f32 rate |\n|---|---|---|---|---|---|---|---|")
WHOLE_MODEL = ("Whole model ({layers} MoE layers) at {tokens} tokens: TFLOP a GPU would do, hours on this machine "
               "(each stage's arithmetic at the measured rates times its measured wall/arithmetic; the expert fit at "
               "30 steps; time outside the stages left out):\n\n| stage | TFLOP f32 | TFLOP f64 | hours here |\n"
               "|---|---|---|---|")


def markdown(results: dict) -> str:
    """Per shape: the stage table and the goals, the extrapolation to the whole model, the measured rates."""
    num = lambda v, f="{:.3g}": "—" if v is None else f.format(v)
    lines = [HEADER]
    for r in results.values():
        d, stages = r["dims"], r["stages"]
        cpu = r.get("cpu_over_wall")
        shared = f"; CPU time / wall {cpu:.2f}" + (" (it shared the cores)" if cpu < 0.9 * r["threads"] else "") \
            if cpu else ""
        over = ", ".join(s for s, row in stages.items() if (row["wall_over_s"] or 0) > 2 and s != TOTAL) or "none"
        title = (f"## {r['shape']}: {d['E']} experts of {d['I']} on hidden {d['H']}, top-{d['k']} -> {d['K']}; "
                 f"{r['tokens']} tokens (blocks of {r['block_size']}), expert fit {r['expert_fit_steps']} steps, "
                 f"{r['threads']} threads; load average {r['load_average']} (before, after){shared}\n")
        summary = (f"Choice: {r['choice']}. compress() {r['compress_wall_s']:.1f} s, of which outside the stages "
                   f"{r['unstaged_s']:.1f} s. Over 2x their arithmetic: {over}; all stages "
                   f"{stages[TOTAL]['wall_over_s']:.2f}x (goal 1.5x).\n")
        lines += [title, summary, STAGE_TABLE]
        for stage, row in stages.items():
            rate = (row["gflop_f32"] + row["gflop_f64"]) / row["arithmetic_s"] if row["arithmetic_s"] else None
            how = "; ".join(row["how"]) or "— (no arithmetic counted: I/O, bookkeeping)"
            lines.append(f"| {stage} | {row['wall_s']:.3g} | {row['gflop_f32']:.4g} + {row['gflop_f64']:.4g} | {how} | "
                         f"{num(rate)} | {num(row['arithmetic_s'])} | {num(row['wall_over_s'], '{:.2f}')} | "
                         f"{num(row['wall_over_f32_s'], '{:.2f}')} |")
        lines += ["", WHOLE_MODEL.format(layers=r["moe_layers"], tokens=FULL_TOKENS)]
        lines += [f"| {s} | {v['tflop_f32']:.4g} | {v['tflop_f64']:.4g} | {v['hours_here']:.3g} |"
                  for s, v in r["extrapolation"].items()]
        lines += ["", "Measured rates, GFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["rates"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="all", choices=("qwen3-30b-a3b", "mixtral-8x7b", "all", "tiny",
                                                           "tiny-mixtral"))
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per calibration block")
    parser.add_argument("--expert-fit-steps", type=int, default=3, help="L-BFGS steps run (extrapolated to 30)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of stages.json and stages.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers.utils import logging

    logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "stages.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in ("qwen3-30b-a3b", "mixtral-8x7b") if args.shape == "all" else (args.shape,):
        rates = Rates()
        results[name] = run_shape(name, args.tokens, args.block_size, args.expert_fit_steps, rates)
        results[name]["rates"] = rates.measured
        path.write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "stages.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
