"""Expert-parallel compression under torchrun (2 gloo processes on the CPU) against one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hcsmoe.cli import main
from hcsmoe.cli.compress import stream_choice
from hcsmoe.distributed import World
from hcsmoe.errors import UserError
from hcsmoe.recipe import Recipe
from hcsmoe.checkpoints.loading import REFERENCE_MODEL
from tests.conftest import make_tiny_model
from tests.test_streaming import assert_same_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--blocks", "2", "--block-size", "32", "--batch-size", "1"]
REFERENCE = ["--blocks", "4", "--block-size", "128"]


def compress_args(model: Path, out: Path, k: int, extra: list[str], threads: int = 1) -> list[str]:
    """`threads` per process: the bits do not depend on it (hcsmoe/workers.py)."""
    return ["compress", str(model), "-k", str(k), "--out", str(out), "--stream", "--no-eval", "-q", "--threads",
            str(threads), *extra]


def torchrun(args: list[str], processes: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """The job's result, with the fault handler on to show where a rank failed."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "hcsmoe", *args]
    environment = dict(os.environ, PYTHONFAULTHANDLER="1")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment,
                          check=False)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def one_process(args: list[str]) -> None:
    assert main(args) == 0


CASES = [("reference", 16, ["--save-stats"]), ("qwen3_moe_bf16", 5, []), ("deepseek_v3", 4, []),
         ("qwen2_moe", 5, ["--method", "hc-smoe"]), ("gpt_oss", 5, ["--method", "reap"])]


@pytest.mark.parametrize("name,k,extra", CASES, ids=[c[0] for c in CASES])
def test_two_ranks_write_the_same_plan_weights_and_statistics_as_one_process(tiny_models, tmp_path, name, k, extra,
                                                                               restore_threads):
    if name == "reference":
        model = REFERENCE_MODEL
    elif name.endswith("_bf16"):  # held and written in bf16: the ranks exchange bf16 experts
        model = make_tiny_model(tmp_path / "bf16", name.removesuffix("_bf16"), dtype=torch.bfloat16)
    else:
        model = tiny_models[name]
    size = REFERENCE if name == "reference" else TINY
    runs = {}
    for label in ("one", "two"):
        stats = ["--save-stats", str(tmp_path / f"{label}.stats")] if "--save-stats" in extra else []
        options = [e for e in extra if e != "--save-stats"] + stats + size
        runs[label] = compress_args(model, tmp_path / label, k, options, threads=2 if label == "one" else 1)
    one_process(runs["one"])  # 2 threads, each rank 1
    done = torchrun(runs["two"])
    assert done.returncode == 0, done.stderr
    assert_same_checkpoint(tmp_path / "one", tmp_path / "two")
    one, two = (json.loads((tmp_path / d / "hcsmoe_plan.json").read_text()) for d in ("one", "two"))
    assert [layer["groups"] for layer in one["layers"]] == [layer["groups"] for layer in two["layers"]]
    assert one["world_size"] == 1 and two["world_size"] == 2
    e = two["layers"][0]["num_experts"]
    ranks = two["layers"][0]["details"]["ranks"]
    assert ranks["experts_read"] == [[0, e // 2], [e // 2, e]]  # each rank read and ran half of the experts
    written = [stop - start for start, stop in ranks["experts_written"]]
    assert sum(written) == k and (min(written) == 0 if name == "gpt_oss" else min(written) > 0)  # fused: one rank
    if stats:
        assert (tmp_path / "one.stats").read_bytes() == (tmp_path / "two.stats").read_bytes()
    assert not list(tmp_path.glob(".*hcsmoe-partial*"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str]) -> list[subprocess.Popen]:
    """Two ranks started by hand (as torchrun would), so that the test can stop one of them."""
    environment = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                       LOCAL_WORLD_SIZE="2")
    return [subprocess.Popen([sys.executable, "-m", "hcsmoe", *args], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=dict(environment, RANK=str(rank), LOCAL_RANK=str(rank)))
            for rank in range(2)]


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_rank_that_dies_or_hangs_stops_the_other_with_one_line_and_leaves_nothing(tmp_path, stop):
    out = tmp_path / "out"
    args = compress_args(REFERENCE_MODEL, out, 16, ["--blocks", "16", "--block-size", "256", "--dist-timeout", "10"])
    ranks = start_ranks(args)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.hcsmoe-partial-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)  # the ranks are calibrating and writing (the whole job takes over 10 s)
        assert ranks[0].poll() is None, ranks[0].stderr.read()
        ranks[1].send_signal(stop)
        started = time.monotonic()
        _, err = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - started
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("hcsmoe: rank ")]
    assert ranks[0].returncode != 0 and len(lines) == 1 and "another rank" in lines[0], err
    assert waited < 10 + 30  # the configured timeout (a killed rank is noticed at once), plus cleaning up
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_world_size_without_torchrun_is_one_line(tiny_models, tmp_path, monkeypatch, capsys):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code = main(compress_args(tiny_models["qwen3_moe"], tmp_path / "out", 4, TINY))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "torchrun" in lines[0] and not (tmp_path / "out").exists()


def test_a_torchrun_job_streams(tmp_path):
    two, recipe = World(rank=0, size=2), Recipe()
    assert stream_choice(tmp_path, None, two, recipe) and stream_choice(tmp_path, True, two, recipe)
    with pytest.raises(UserError, match="drop --no-stream"):
        stream_choice(tmp_path, False, two, recipe)


def test_shares_cover_every_expert_once_in_rank_order():
    for size in (1, 2, 3, 7):
        shares = World(0, size).shares(60)
        assert [e for share in shares for e in share] == list(range(60))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
