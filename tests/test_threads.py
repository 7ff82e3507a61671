"""The same command writes the same bits on any machine: torch's kernels run on one thread each and the cores
are used by a pool of workers over experts and batches (hcsmoe/workers.py), so the thread count changes only
how fast a compression runs. Before, a tiny DeepSeek-V3-shaped model gave three different models at 1, 2 and 4
threads (docs/scale.md)."""

from __future__ import annotations

import threading

import pytest
import torch

from hcsmoe.workers import one_thread_kernels, parallel_map, workers
from tests.test_cli import run_cli
from tests.test_resume import digests


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_a_compression_writes_the_same_bits_at_any_thread_count(capsys, tiny_models, tmp_path, restore_threads, stream):
    written = {}
    for threads in (1, 2, 4):
        out = tmp_path / str(threads)
        code, _, err = run_cli(capsys, "compress", str(tiny_models["deepseek_v3"]), "-k", "4", stream, "--no-eval", "-q",
                               "--blocks", "2", "--block-size", "32", "--threads", str(threads), "--out", str(out))
        assert code == 0, err
        written[threads] = digests(out)
    assert written[1] == written[2] == written[4] and "model.safetensors" in written[1]


def test_the_pool_keeps_the_order_the_grad_mode_and_the_thread_count(restore_threads):
    torch.set_num_threads(3)
    with one_thread_kernels():
        assert torch.get_num_threads() == 1 and workers() == 3
        names = parallel_map(lambda i: (i, threading.current_thread().name), range(12))
        assert [i for i, _ in names] == list(range(12)) and all(name.startswith("hcsmoe") for _, name in names)
        with torch.no_grad():
            assert parallel_map(lambda i: torch.is_grad_enabled(), range(4)) == [False] * 4
        assert parallel_map(lambda i: torch.is_grad_enabled(), range(4)) == [True] * 4
        nested = parallel_map(lambda i: parallel_map(lambda j: (i, j, threading.current_thread().name), range(2)), range(2))
        assert all(name == outer[0][2] for outer in nested for _, _, name in outer)  # inner calls run inline
    assert torch.get_num_threads() == 3 and workers() == 1


def test_fewer_batches_run_at_once_where_memory_is_short(monkeypatch, restore_threads):
    from hcsmoe.runners import layerwise

    inputs = layerwise.LayerInputs([torch.zeros(4, 2048, 1024)] * 8, [])
    per_batch = 4 * 2048 * 1024 * 4 * layerwise.BATCH_WORKING_COPIES
    torch.set_num_threads(4)
    with one_thread_kernels():
        monkeypatch.setattr(layerwise, "available_memory", lambda: 4 * 10 * per_batch)
        assert layerwise.batches_at_once(inputs) == 4  # as many as the workers
        monkeypatch.setattr(layerwise, "available_memory", lambda: 4 * 2 * per_batch)
        assert layerwise.batches_at_once(inputs) == 2
        monkeypatch.setattr(layerwise, "available_memory", lambda: 1000)
        assert layerwise.batches_at_once(inputs) == 1
    assert layerwise.batches_at_once(inputs) == 1  # outside a compression: one worker
