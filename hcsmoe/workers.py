"""Every core busy, the same bits on any machine: torch's kernels on one thread each, the cores used by a
pool of workers over independent pieces of work (experts, token chunks).

A multi-threaded kernel splits its sums by thread count: MKL's small matrix products, ATen's whole-tensor
reductions and L-BFGS's dot products round differently with 1, 2 or 16 threads, and each corrective fit
amplifies the difference layer after layer (measured in docs/scale.md: 1.5 of a tensor's largest value by the
fourth layer of the bundled Qwen2-MoE). With every kernel on one thread, each piece of work sums in one order
whatever the machine; the pool decides only when a piece runs, never how it is computed, and results are put
back together in a fixed order. So a compression writes the bits of a one-thread run at any --threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_pool_size = 1
_inside = threading.local()


@contextmanager
def one_thread_kernels(device: str = "cpu"):
    """Within the block, torch's CPU kernels run on one thread each and `parallel_map` spreads work over as
    many workers as torch had threads; both are restored after. On a GPU the kernels' order does not depend
    on CPU threads: nothing changes there. Nested blocks keep the outer one's pool."""
    global _pool, _pool_size
    threads = torch.get_num_threads()
    if not str(device).startswith("cpu") or _pool is not None or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="hcsmoe"), threads
    try:
        yield
    finally:
        pool, _pool, _pool_size = _pool, None, 1
        pool.shutdown()
        torch.set_num_threads(threads)


def workers() -> int:
    """How many pieces of work run at once (1 outside one_thread_kernels)."""
    return _pool_size


def parallel_map(work: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """[work(item) for item in items], spread over the pool, in the items' order. Each call runs with the
    caller's grad mode (it is per thread in torch); a call from inside a worker runs inline."""
    items = list(items)
    if _pool is None or len(items) < 2 or getattr(_inside, "worker", False):
        return [work(item) for item in items]
    grad = torch.is_grad_enabled()

    def run(item: T) -> R:
        _inside.worker = True
        try:
            with torch.set_grad_enabled(grad):
                return work(item)
        finally:
            _inside.worker = False

    return list(_pool.map(run, items))
