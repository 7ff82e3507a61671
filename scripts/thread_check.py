"""Do the written weights depend on the thread count? (issue 26, item 3.) Compresses each bundled model at 25%
and 50% of its experts removed, with --threads 1 and --threads N, and compares the written tensors: the sha256
of each safetensors file, and the largest difference of each tensor relative to its largest value (in float32),
layer by layer.

    python scripts/thread_check.py [--models reference,qwen2-moe] [--threads 2] [--stream]
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def compress(model: str, experts: int, threads: int, out: Path, stream: bool) -> float:
    """`hcsmoe compress` (the default recipe) as its own process; its wall time in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "hcsmoe.cli", "compress", model, "-k", str(experts), "--no-eval", "-q",
                    "--threads", str(threads), "--out", str(out), "--stream" if stream else "--no-stream"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def largest_differences(a: Path, b: Path) -> dict[str, float]:
    """Per decoder layer (or 'other'), the largest |a - b| of any tensor relative to that tensor's largest |a|."""
    worst: dict[str, float] = {}
    for shard in sorted(a.glob("*.safetensors")):
        left, right = load_file(str(shard)), load_file(str(b / shard.name))
        for name, tensor in left.items():
            x, y = tensor.float(), right[name].float()
            scale = float(x.abs().max()) or 1.0
            parts = name.split(".")
            layer = f"layer {parts[parts.index('layers') + 1]}" if "layers" in parts else "other"
            worst[layer] = max(worst.get(layer, 0.0), float((x - y).abs().max()) / scale)
    return worst


def digest(directory: Path) -> str:
    h = hashlib.sha256()
    for shard in sorted(directory.glob("*.safetensors")):
        h.update(shard.read_bytes())
    return h.hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="reference,qwen2-moe")
    parser.add_argument("--threads", type=int, default=2, help="the count compared with 1 [2]")
    parser.add_argument("--stream", action="store_true", help="the streaming path (default: in memory)")
    args = parser.parse_args()
    from hcsmoe.checkpoints.architectures import architecture_for, expert_count
    from hcsmoe.checkpoints.loading import BUNDLED_MODELS, load_config

    print("| model | experts kept | sha256, 1 thread | sha256, N threads | largest difference per layer | time N / 1 |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            path = str(BUNDLED_MODELS[name])
            config = load_config(Path(path))
            total = expert_count(config, architecture_for(config))
            for kept in (total // 2, total * 3 // 4):
                runs = {t: Path(scratch) / f"{name}-{kept}-{t}" for t in (1, args.threads)}
                seconds = {t: compress(path, kept, t, out, args.stream) for t, out in runs.items()}
                differences = largest_differences(runs[1], runs[args.threads])
                shown = ", ".join(f"{layer} {value:.1e}" for layer, value in sorted(differences.items()))
                print(f"| {name} | {kept} of {total} | {digest(runs[1])} | {digest(runs[args.threads])} | {shown} | "
                      f"{seconds[args.threads] / seconds[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
