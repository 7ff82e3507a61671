"""End-to-end time and peak memory of compressing the reference model to half its experts.

Runs the same steps as `hcsmoe compress --no-eval` (load, calibrate on 32 blocks of the default
calibration text, cluster, merge, save) and prints the time of each stage and the peak resident memory.

    python -m benchmarks.compress_speed   # writes benchmarks/results/compress_speed.json
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging

from hcsmoe.checkpoints.loading import REFERENCE_MODEL
from hcsmoe.pipeline import compress

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    logging.set_verbosity_error()
    torch.set_num_threads(2)
    start = time.perf_counter()
    result = compress(REFERENCE_MODEL, ratio=0.5, progress=False)
    with tempfile.TemporaryDirectory() as directory:
        mark = time.perf_counter()
        result.save(Path(directory) / "out")
        save_seconds = time.perf_counter() - mark
    total = time.perf_counter() - start
    stages = dict(result.info["seconds"], save=round(save_seconds, 3))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {"experts": f"{result.info['experts_before']} -> {result.info['experts_after']}",
              "total_seconds": round(total, 2), "stages_seconds": stages, "peak_rss_mib": round(peak_mib, 1),
              "threads": torch.get_num_threads()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compress_speed.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
