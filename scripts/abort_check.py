"""The flaky-abort check (issue 26): run the distributed tests' smallest case as N consecutive torchrun jobs of
2 gloo ranks and count how each ended. A rank that aborts (SIGABRT, no Python traceback) shows as a non-zero
exit with "SIGABRT" or "Fatal Python error" in torchrun's output; the fault handler is on so that it says where.

    python scripts/abort_check.py [--runs 200]   # prints one line per failure and the counts at the end
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cores_on() -> None:
    """In the child before exec: no limit on core files."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--logs", type=Path, help="write each failed run's whole output there (run-N.txt)")
    parser.add_argument("--until-abort", action="store_true", help="stop at the first abort")
    parser.add_argument("--cores", type=Path, help="run the ranks there with core dumps on (core_pattern 'core'): "
                        "an aborted rank leaves its core for gdb")
    args = parser.parse_args()
    from tests.conftest import make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="hcsmoe-abort-check-"))
    model = make_tiny_model(work / "deepseek_v3", "deepseek_v3")
    outcomes: collections.Counter = collections.Counter()
    start = time.perf_counter()
    for run in range(args.runs):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "hcsmoe",
                   "compress", str(model), "-k", "4", "--stream", "--no-eval", "-q", "--threads", "1", "--blocks", "2",
                   "--block-size", "32", "--batch-size", "1", "--out", str(out)]
        done = subprocess.run(command, cwd=args.cores or ROOT, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, PYTHONFAULTHANDLER="1"), preexec_fn=cores_on if args.cores else None)
        aborted = "SIGABRT" in done.stderr or "Fatal Python error" in done.stderr
        outcome = "ok" if done.returncode == 0 and (out / "config.json").is_file() else "abort" if aborted else "failed"
        outcomes[outcome] += 1
        if outcome != "ok":
            print(f"run {run}: {outcome}, exit {done.returncode}\n{done.stderr[-4000:]}", flush=True)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                (args.logs / f"run-{run}.txt").write_text(done.stdout + done.stderr)
            if args.until_abort and outcome == "abort":
                break
    shutil.rmtree(work, ignore_errors=True)
    print(f"{sum(outcomes.values())} runs in {(time.perf_counter() - start) / 60:.1f} min: "
          + ", ".join(f"{name} {count}" for name, count in sorted(outcomes.items())))


if __name__ == "__main__":
    main()
