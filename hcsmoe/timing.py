"""Wall time spent in each pipeline stage, added up per process (a
counter that only grows; read it with spent() and since()).

The runners read it after each MoE layer (the estimate a long job prints after its first layer) and
benchmarks/stages.py reads it to set each stage's time against the arithmetic it needs. Stages do not nest:
a stage's time is its own.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

STAGES = ("calibrate", "plan", "apply", "router fit", "refit", "choice", "expert fit", "write")
_spent: dict[str, float] = defaultdict(float)


@contextmanager
def timed(stage: str):
    """Add the block's wall time to `stage`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _spent[stage] += time.perf_counter() - start


def spent() -> dict[str, float]:
    """Seconds spent per stage so far (in pipeline order)."""
    ordered = {stage: _spent[stage] for stage in STAGES if stage in _spent}
    return ordered | {stage: value for stage, value in _spent.items() if stage not in ordered}


def since(before: dict[str, float]) -> dict[str, float]:
    """Seconds spent per stage since `before` (an earlier spent())."""
    return {stage: value - before.get(stage, 0.0) for stage, value in spent().items()}


def reset() -> None:
    _spent.clear()
