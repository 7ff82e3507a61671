"""Models larger than memory: peak memory of a streaming run, speed of the statistics pass, re-planning.

    python -m benchmarks.streaming memory   # ~8 GB synthetic Qwen3-MoE checkpoint -> 64 experts, peak RSS
    python -m benchmarks.streaming memory --layers 1 --refit-steps 5   # the same, one layer, with the expert fit
    python -m benchmarks.streaming memory --layers 1 --refit-steps 2 --refit-memory 0.5   # the fit one expert at a time
    python -m benchmarks.streaming memory --layers 1 --fast   # one layer without the expert fit, to compare with
    python -m benchmarks.streaming fp8      # the same in Qwen3-FP8's layout: sizes in/out, kept bits, peak RSS
    python -m benchmarks.streaming in-memory --layers 1   # peak RSS of the in-memory path over the checkpoint
    python -m benchmarks.streaming in-memory --layers 1 --refit-steps 2 --refit-memory 0.5   # the same, fit per expert
    python -m benchmarks.streaming speed    # one real-shaped layer: statistics pass vs its bare matmuls
    python -m benchmarks.streaming replan   # reference model: compress from a statistics file vs calibrating
    python -m benchmarks.streaming ranks    # 1 vs 2 torchrun processes: bytes read, peak RSS and time per rank

Each writes benchmarks/results/streaming-<name>.json and prints it. Numbers are ratios measured in one
run (same machine, same threads), not absolute times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# Real Qwen3-30B-A3B MoE shapes; vocabulary reduced (the bundled tokenizer has 8192 tokens).
QWEN3_SHAPES = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                    num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                    vocab_size=32768, max_position_embeddings=4096, tie_word_embeddings=False)


FP8_BLOCK = (128, 128)


def qwen3_config(layers: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(num_hidden_layers=layers, dtype="bfloat16", **QWEN3_SHAPES)


def write_synthetic_checkpoint(directory: Path, layers: int, seed: int = 0, fp8: bool = False, config=None) -> int:
    """Random bf16 weights with real shapes, in the per-expert naming of Qwen3-MoE checkpoints, one layer
    at a time (never the whole model in memory); `fp8`: laid out as Qwen3-30B-A3B-FP8 (128x128 blocks).
    `config`: another model's config (e.g. Mixtral's; its vocabulary must hold the bundled tokenizer's 8192
    tokens) instead of Qwen3-30B's with `layers` layers. Returns the checkpoint's size in bytes."""
    from tests.quantized import fp8_config, fp8_tensors

    from hcsmoe.checkpoints.shards import ShardWriter, checkpoint_names
    from hcsmoe.checkpoints.loading import REFERENCE_MODEL
    from hcsmoe.checkpoints.loading import skeleton

    config = config or qwen3_config(layers)
    layers = int(config.num_hidden_layers)
    model = skeleton(config)
    generator = torch.Generator().manual_seed(seed)
    directory.mkdir(parents=True)
    writer = ShardWriter(directory, max_shard_bytes=2**30)
    state = model.state_dict()
    groups = [[n for n in state if not n.startswith("model.layers.")]]
    groups += [[n for n in state if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    for names in groups:
        tensors = checkpoint_names(model, {n: random_weight(n, state[n].shape, generator) for n in names})
        writer.add(fp8_tensors(tensors, FP8_BLOCK) if fp8 else tensors)
    writer.finish()
    if fp8:
        config.quantization_config = fp8_config(FP8_BLOCK)
    config.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_MODEL / name, directory / name)
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def random_weight(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def memory(layers: int, blocks: int, block_size: int, keep: bool, fp8: bool = False, method: str | None = None,
           refit_steps: int = 0, fast: bool = False, refit_memory: float | None = None) -> dict:
    """Stream-compress the synthetic checkpoint to 64 experts in a child process (with `refit_steps`, the
    opt-in expert fit too); its peak RSS vs size."""
    root = Path(tempfile.mkdtemp(prefix="hcsmoe-synthetic-", dir=os.environ.get("HCSMOE_BENCH_DIR")))
    source, out = root / "qwen3-synthetic", root / "compressed"
    start = time.perf_counter()
    size = write_synthetic_checkpoint(source, layers, fp8=fp8)
    generated = time.perf_counter() - start
    arguments = ["compress", str(source), "--experts", "64", "--out", str(out), "--stream", "--no-eval", "--quiet",
                 "--blocks", str(blocks), "--block-size", str(block_size), "--batch-size", "1"]
    arguments += ["--method", method] if method else []
    arguments += ["--refit-steps", str(refit_steps)] if refit_steps else []
    arguments += ["--fast"] if fast else []
    arguments += ["--refit-memory", str(refit_memory)] if refit_memory else []
    start = time.perf_counter()
    peak = peak_resident_bytes(arguments)
    seconds = time.perf_counter() - start
    reload = reload_check(out)
    out_size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    formats = format_check(source, out) if fp8 else {}
    if not keep:
        shutil.rmtree(root)
    return {"layers": layers, "format": "fp8 128x128 blocks" if fp8 else "bf16",
            "method": method or ("default --fast" if fast else "default"),
            **({"refit_steps": refit_steps} if refit_steps else {}),
            **({"refit_memory_gib": refit_memory} if refit_memory else {}), **formats, "checkpoint_bytes": size, "output_bytes": out_size, "peak_rss_bytes": peak,
            "peak_rss_over_checkpoint": round(peak / size, 4), "calibration_tokens": blocks * block_size,
            "compress_seconds": round(seconds, 1), "generate_seconds": round(generated, 1), "reload": reload}


def in_memory(layers: int, blocks: int, block_size: int, fast: bool = False, refit_steps: int = 0,
              refit_memory: float | None = None) -> dict:
    """Peak memory of the in-memory path (--no-stream) over the checkpoint's size, for a weighted merge and the
    default recipe at 64 experts, and for the default itself (--size 0.5, its probes included): what `hcsmoe
    compress` sizes its choice of streaming by (commands.IN_MEMORY_FACTOR). `refit_steps`, `refit_memory`: the
    expert fit's steps and budget in the default's runs."""
    root = Path(tempfile.mkdtemp(prefix="hcsmoe-synthetic-", dir=os.environ.get("HCSMOE_BENCH_DIR")))
    source = root / "qwen3-synthetic"
    size = write_synthetic_checkpoint(source, layers)
    result = {"layers": layers, "checkpoint_bytes": size, "calibration_tokens": blocks * block_size}
    default = ["--fast"] if fast else []
    default += ["--refit-steps", str(refit_steps)] if refit_steps else []
    default += ["--refit-memory", str(refit_memory)] if refit_memory else []
    result |= {"refit_steps": refit_steps} if refit_steps else {}
    result |= {"refit_memory_gib": refit_memory} if refit_memory else {}
    runs = (("hc-smoe", ["--experts", "64", "--method", "hc-smoe"]),
            ("default --fast" if fast else "default", ["--experts", "64", *default]),
            ("default --fast, --size 0.5" if fast else "default, --size 0.5", default))  # the default's own shape
    for name, method in runs:
        out = root / name
        start = time.perf_counter()
        peak = peak_resident_bytes(["compress", str(source), "--out", str(out), "--no-stream",
                                    "--no-eval", "--quiet", "--blocks", str(blocks), "--block-size", str(block_size),
                                    "--batch-size", "1", *method])
        result[name] = {"peak_rss_bytes": peak, "peak_over_checkpoint": round(peak / size, 2),
                        "seconds": round(time.perf_counter() - start, 1)}
        shutil.rmtree(out)
    shutil.rmtree(root)
    return result


def format_check(source: Path, out: Path) -> dict:
    """Bytes of the experts in and out, and how many stored tensors (weights and scales) of the experts kept
    unmerged are the input's bit for bit."""
    from safetensors import safe_open

    from hcsmoe.checkpoints.shards import checkpoint_files, stored_metadata
    from hcsmoe.checkpoints.formats import SAFETENSORS_TO_TORCH

    def read(files: dict[str, Path], key: str) -> torch.Tensor:
        with safe_open(str(files[key]), "pt") as handle:
            return handle.get_tensor(key)

    def expert_bytes(files: dict[str, Path]) -> int:  # from the file headers: no tensor is read
        return sum(math.prod(shape) * SAFETENSORS_TO_TORCH[dtype].itemsize
                   for key, (shape, dtype) in stored_metadata(files).items() if ".experts." in key)

    before, after = checkpoint_files(source), checkpoint_files(out)
    same = total = 0
    for layer in json.loads((out / "hcsmoe_plan.json").read_text())["layers"]:
        for slot, group in enumerate(layer["groups"]):
            if len(group["members"]) != 1:
                continue
            prefix = f"model.layers.{layer['layer']}.mlp.experts."
            for key in [k for k in after if k.startswith(f"{prefix}{slot}.")]:
                original = key.replace(f"{prefix}{slot}.", f"{prefix}{group['members'][0]}.")
                a, b = read(after, key), read(before, original)
                same += a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
                total += 1
    quantization = [json.loads((d / "config.json").read_text()).get("quantization_config") for d in (source, out)]
    return {"expert_bytes_in": expert_bytes(before), "expert_bytes_out": expert_bytes(after),
            "kept_expert_tensors_bit_identical": f"{same} of {total}",
            "quantization_config_kept": quantization[0] == quantization[1]}


def peak_resident_bytes(arguments: list[str]) -> int:
    """Run `hcsmoe ARGUMENTS` in a fresh process and return its peak resident memory (VmHWM).

    Read by the process itself at exit: rusage's maxrss would also count the pages a forked child
    shared with this (large) parent before exec."""
    code = ("import atexit, sys\n"
            "def report():\n"
            "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
            "    print('VMHWM', int(line.split()[1]) * 1024, file=sys.stderr)\n"
            "atexit.register(report)\n"
            "from hcsmoe.cli import main\n"
            f"sys.exit(main({arguments!r}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return int(next(l for l in result.stderr.splitlines() if l.startswith("VMHWM")).split()[1])


RANK_PROBE = """import atexit, os, sys
from hcsmoe.checkpoints.shards import StoredCheckpoint
read = [0]
parts = StoredCheckpoint.parts
def counted(self, key, start=None, stop=None):
    found = parts(self, key, start, stop)
    read[0] += sum(p.numel() * p.element_size() for p in found)
    return found
StoredCheckpoint.parts = counted
def report():
    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:'))
    print('RANK', os.environ.get('RANK', '0'), int(line.split()[1]) * 1024, read[0], file=sys.stderr)
atexit.register(report)
from hcsmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_ranks(processes: int, arguments: list[str], probe: Path) -> dict:
    """`hcsmoe ARGUMENTS` as one process or as a torchrun job: per rank, the checkpoint bytes it read (counted
    where every stored tensor is fetched) and its peak resident memory; the job's wall time."""
    launcher = ([sys.executable] if processes == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"])
    start = time.perf_counter()
    result = subprocess.run([*launcher, str(probe), *arguments], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    ranks = sorted(tuple(map(int, line.split()[1:])) for line in result.stderr.splitlines() if line.startswith("RANK "))
    return {"processes": processes, "seconds": round(seconds, 1),
            "per_rank": [{"rank": r, "peak_rss_bytes": peak, "checkpoint_bytes_read": read} for r, peak, read in ranks]}


def ranks(layers: int, blocks: int, block_size: int, method: str | None, fast: bool = False) -> dict:
    """The synthetic checkpoint compressed to 64 experts by 1 process and by 2 torchrun ranks (each rank gets
    its share of the cores): bytes read and peak memory per rank, wall time, and that both write the same bits."""
    from tests.test_streaming import assert_same_checkpoint

    root = Path(tempfile.mkdtemp(prefix="hcsmoe-synthetic-", dir=os.environ.get("HCSMOE_BENCH_DIR")))
    source = root / "qwen3-synthetic"
    size = write_synthetic_checkpoint(source, layers)
    probe = root / "probe.py"
    probe.write_text(RANK_PROBE)
    cores = len(os.sched_getaffinity(0))
    runs = {}
    for processes in (1, 2):
        threads = max(1, cores // processes)
        arguments = ["compress", str(source), "--experts", "64", "--out", str(root / f"out-{processes}"), "--stream",
                     "--no-eval", "--quiet", "--blocks", str(blocks), "--block-size", str(block_size),
                     "--batch-size", "1", "--threads", str(threads)] + (["--method", method] if method else [])
        arguments += ["--fast"] if fast else []
        runs[processes] = run_ranks(processes, arguments, probe) | {"threads_per_rank": threads}
    try:
        assert_same_checkpoint(root / "out-1", root / "out-2")
        same = "bit-identical"
    except AssertionError:
        same = "differ (threads per rank differ: see README)"
    shutil.rmtree(root)
    one, two = runs[1]["per_rank"][0], runs[2]["per_rank"]
    return {"layers": layers, "checkpoint_bytes": size, "method": method or "default", "cores": cores,
            "calibration_tokens": blocks * block_size, "one_process": runs[1], "two_processes": runs[2],
            "outputs": same,
            "read_per_rank_over_one": [round(r["checkpoint_bytes_read"] / one["checkpoint_bytes_read"], 3) for r in two],
            "peak_per_rank_over_one": [round(r["peak_rss_bytes"] / one["peak_rss_bytes"], 3) for r in two],
            "wall_two_over_one": round(runs[2]["seconds"] / runs[1]["seconds"], 3)}


def reload_check(out: Path) -> dict:
    """Load the output with plain transformers in a fresh process and run a forward pass."""
    code = (
        "import json, torch; from transformers import AutoModelForCausalLM as M;"
        f"m, info = M.from_pretrained({str(out)!r}, output_loading_info=True);"
        "y = m(torch.arange(16)[None]).logits;"
        "print(json.dumps({'missing': len(info['missing_keys']), 'unexpected': len(info['unexpected_keys']),"
        " 'experts': m.config.num_experts, 'finite': bool(torch.isfinite(y).all())}))"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def speed(tokens: int, repeats: int) -> dict:
    """The statistics pass of one real-shaped layer vs the bare matrix products it needs, same threads."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from hcsmoe.checkpoints.architectures import MoELayer, architecture_for
    from hcsmoe.calibration.statistics import LayerAccumulator, expert_pass, route_tokens
    from hcsmoe.checkpoints.shards import MemorySource
    from hcsmoe.runners.layerwise import expert_chunks

    torch.manual_seed(0)
    config = qwen3_config(1)
    block = Qwen3MoeSparseMoeBlock(config).float().eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    architecture = architecture_for(config)
    moe = MoELayer(0, block, block.gate, block.experts)
    x = torch.randn(tokens, config.hidden_size)
    chunks = expert_chunks(block, moe, MemorySource(block))

    def statistics_pass():
        probs, weights, indices = route_tokens(moe, architecture, x)
        accumulator = LayerAccumulator(moe, architecture, tokens)
        accumulator.add_routing(probs, indices, x)
        expert_pass(x, indices, weights, chunks(), architecture, accumulator)
        return accumulator.result()

    _, _, indices = route_tokens(moe, architecture, x)
    routed = [(indices == e).any(-1).nonzero().squeeze(-1) for e in range(moe.num_experts)]

    def bare_matmuls():
        """x @ gate_up for every expert on every token, down_proj on each expert's routed tokens."""
        for first, view in chunks():
            h = torch.matmul(x.unsqueeze(0), view.gate_up_proj.transpose(1, 2))
            for local in range(view.down_proj.shape[0]):
                tokens_e = routed[first + local]
                torch.matmul(h[local, tokens_e, : h.shape[-1] // 2], view.down_proj[local].T)

    timings = {"statistics": [], "bare": []}
    with torch.no_grad():
        for _ in range(repeats):
            for name, run in (("statistics", statistics_pass), ("bare", bare_matmuls)):
                start = time.perf_counter()
                run()
                timings[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in timings.items()}
    return {"tokens": tokens, "experts": moe.num_experts, "hidden": config.hidden_size,
            "expert_dim": config.moe_intermediate_size, "threads": torch.get_num_threads(),
            "seconds": {k: [round(v, 2) for v in vs] for k, vs in timings.items()},
            "ratio_statistics_over_bare": round(best["statistics"] / best["bare"], 3)}


def replan() -> dict:
    """Reference model, in one process: compress with calibration, then from the saved statistics at
    another K; the second run plans and merges only."""
    from hcsmoe.calibration.statistics import Statistics
    from hcsmoe.checkpoints.loading import REFERENCE_MODEL
    from hcsmoe.pipeline import compress

    root = Path(tempfile.mkdtemp(prefix="hcsmoe-replan-"))
    start = time.perf_counter()
    options = {"method": "hc-smoe", "num_blocks": 32, "progress": False}  # re-planning needs no per-token fit
    first = compress(REFERENCE_MODEL, num_experts=16, **options)
    calibrated = time.perf_counter() - start
    first.stats.save(root / "stats.safetensors")
    start = time.perf_counter()
    again = compress(REFERENCE_MODEL, num_experts=24, stats=Statistics.load(root / "stats.safetensors"), **options)
    replanned = time.perf_counter() - start
    shutil.rmtree(root)
    return {"with_calibration_seconds": round(calibrated, 3), "stages": first.info["seconds"],
            "from_statistics_file_seconds": round(replanned, 3), "stages_from_file": again.info["seconds"],
            "ratio": round(replanned / calibrated, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=("memory", "fp8", "in-memory", "speed", "replan", "ranks"))
    parser.add_argument("--layers", type=int, default=6, help="memory: decoder layers (6 make about 8 GB)")
    parser.add_argument("--blocks", type=int, default=4, help="memory: calibration blocks")
    parser.add_argument("--block-size", type=int, default=256, help="memory: tokens per block")
    parser.add_argument("--tokens", type=int, default=2048, help="speed: tokens through the layer")
    parser.add_argument("--repeats", type=int, default=2, help="speed: runs of each (the best is kept)")
    parser.add_argument("--keep", action="store_true", help="memory: keep the synthetic checkpoint")
    parser.add_argument("--method", help="memory, fp8, ranks: compression method [default; fp8: reap]")
    parser.add_argument("--refit-steps", type=int, default=0,
                        help="memory, in-memory: the expert fit's steps [the default's]")
    parser.add_argument("--refit-memory", type=float, help="memory, in-memory: the expert fit's memory budget in GiB [8]")
    parser.add_argument("--fast", action="store_true", help="memory, in-memory, ranks: the closed-form recipe "
                                                            "(the default before the expert fit became its last stage)")
    args = parser.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    if args.benchmark == "memory":
        result = memory(args.layers, args.blocks, args.block_size, args.keep, method=args.method,
                        refit_steps=args.refit_steps, fast=args.fast, refit_memory=args.refit_memory)
    elif args.benchmark == "in-memory":
        result = in_memory(args.layers, args.blocks, args.block_size, args.fast, args.refit_steps, args.refit_memory)
    elif args.benchmark == "fp8":
        result = memory(args.layers, args.blocks, args.block_size, args.keep, fp8=True, method=args.method or "reap")
    elif args.benchmark == "speed":
        result = speed(args.tokens, args.repeats)
    elif args.benchmark == "ranks":
        result = ranks(args.layers, args.blocks, args.block_size, args.method, args.fast)
    else:
        result = replan()
    RESULTS.mkdir(exist_ok=True)
    name = f"{args.benchmark}-{args.method}" if args.benchmark == "ranks" and args.method else args.benchmark
    name += "-expert-fit" if args.refit_steps else ""
    name += f"-refit-memory-{args.refit_memory:g}" if args.refit_memory else ""
    name += f"-{args.layers}-layer{'s' * (args.layers > 1)}" if args.benchmark == "memory" and args.layers != 6 else ""
    (RESULTS / f"streaming-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
