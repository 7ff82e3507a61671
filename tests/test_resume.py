"""Jobs of hours survive: a streaming run killed after a layer continues with --resume and writes the same
bits; another recipe is refused in one line (the kept layers stay); a run without --resume starts over."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

from hcsmoe.checkpoints.saving import leftovers
from tests.test_cli import assert_one_line_error, run_cli

# Runs `hcsmoe ARGS` and signals itself (SIGNAL, by default SIGKILL: nothing can clean up) right after the
# journal records decoder layer KILL_AFTER as done.
KILLED_AFTER = """
import os, sys
from hcsmoe.runners import journal
save = journal.Journal.save
def save_then_die(self, next_layer, *args, **kwargs):
    save(self, next_layer, *args, **kwargs)
    if next_layer == int(os.environ["KILL_AFTER"]) and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", "0"):
        os.kill(os.getpid(), int(os.environ.get("SIGNAL", "9")))
journal.Journal.save = save_then_die
from hcsmoe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())
            if p.suffix == ".safetensors" or p.name in ("config.json", "hcsmoe_plan.json", "model.safetensors.index.json")}


def killed_run(arguments: list[str], after: int, signal: int = 9) -> subprocess.CompletedProcess:
    """`hcsmoe ARGS` on one thread in another process, killed after decoder layer `after` (-1: never)."""
    return subprocess.run([sys.executable, "-c", KILLED_AFTER, *arguments], capture_output=True, text=True,
                          env={**os.environ, "KILL_AFTER": str(after), "SIGNAL": str(signal), "OMP_NUM_THREADS": "1"})


def test_a_killed_streaming_run_resumes_to_the_same_bits(capsys, tiny_models, tmp_path):
    common = ["compress", str(tiny_models["deepseek_v3"]), "-k", "4", "--stream", "--no-eval", "-q", "--blocks", "2",
              "--block-size", "32"]
    whole = killed_run([*common, "--out", str(tmp_path / "whole")], after=-1)  # one thread, as the killed run
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "resumed"
    killed = killed_run([*common, "--out", str(out)], after=2)  # the dense layer 0 and MoE layer 1 done, 2 to go
    assert killed.returncode == -9 and not out.exists()
    assert len(leftovers(out)) == 1
    threads = torch.get_num_threads()
    try:  # another thread count than the killed run's: the bits do not depend on it
        code, _, err = run_cli(capsys, *common, "--out", str(out), "--resume", "--threads", "3")
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and "resuming at decoder layer 2 of 3" in err, err
    assert digests(out) == digests(tmp_path / "whole") and "model.safetensors" in "".join(digests(out))
    assert not leftovers(out) and sorted(p.name for p in tmp_path.iterdir()) == ["resumed", "whole"]


def test_another_recipe_is_refused_and_a_plain_run_starts_over(capsys, tiny_models, tmp_path):
    common = ["compress", str(tiny_models["qwen3_moe"]), "--stream", "--no-eval", "-q", "--blocks", "2",
              "--block-size", "32", "--out", str(tmp_path / "o")]
    killed = killed_run([*common, "-k", "4"], after=1)
    assert killed.returncode == -9 and len(leftovers(tmp_path / "o")) == 1
    code, _, err = run_cli(capsys, *common, "-k", "5", "--resume")
    assert_one_line_error(code, err)
    assert "other arguments" in err and len(leftovers(tmp_path / "o")) == 1  # the kept layers stay
    code, _, err = run_cli(capsys, *common, "-k", "5")
    assert code == 0, err
    assert not leftovers(tmp_path / "o") and sorted(p.name for p in tmp_path.iterdir()) == ["o"]


def test_resume_with_nothing_to_resume_starts_from_the_first_layer(capsys, tiny_models, tmp_path):
    code, _, err = run_cli(capsys, "compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--no-eval", "-q", "--blocks",
                           "2", "--block-size", "32", "--out", str(tmp_path / "o"), "--resume")
    assert code == 0 and "no interrupted run" in err and (tmp_path / "o" / "config.json").is_file()


def test_sigterm_keeps_the_finished_layers_and_says_how_to_resume(tiny_models, tmp_path):
    out = tmp_path / "o"
    stopped = killed_run(["compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--stream", "--no-eval", "-q",
                          "--blocks", "2", "--block-size", "32", "--out", str(out)], after=1, signal=15)
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert stopped.returncode == 130 and len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in stopped.stderr
    assert not out.exists() and len(leftovers(out)) == 1


def torchrun_job(script: Path, arguments: list[str], after: int) -> subprocess.CompletedProcess:
    """`hcsmoe ARGS` as a torchrun job of 2 gloo ranks, one thread each; rank 1 SIGKILLed right after decoder
    layer `after` is committed (-1: never)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               *arguments, "--threads", "1"]
    environment = {**os.environ, "KILL_AFTER": str(after), "KILL_RANK": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def test_a_torchrun_job_that_lost_a_rank_resumes_to_the_same_bits(tiny_models, tmp_path):
    """Each rank journals its own shards; rank 0 commits a layer once both kept theirs. Rank 1 killed after
    layer 2 of the DeepSeek-V3-shaped model: the job dies, its journal stays, and the resumed job writes the
    uninterrupted job's files (every rank's shards, the index, config and plan)."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER)
    common = ["compress", str(tiny_models["deepseek_v3"]), "-k", "4", "--stream", "--no-eval", "-q", "--blocks", "2",
              "--block-size", "32", "--batch-size", "1"]
    whole = torchrun_job(script, [*common, "--out", str(tmp_path / "whole")], after=-1)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "resumed"
    killed = torchrun_job(script, [*common, "--out", str(out)], after=2)
    assert killed.returncode != 0 and not out.exists() and len(leftovers(out)) == 1, killed.stderr
    resumed = torchrun_job(script, [*common, "--out", str(out), "--resume"], after=-1)
    assert resumed.returncode == 0 and "resuming at decoder layer 2 of 3" in resumed.stderr, resumed.stderr
    assert digests(out) == digests(tmp_path / "whole") and len(digests(out)) >= 4
    assert not leftovers(out)
