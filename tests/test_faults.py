"""Faults and bad checkpoints: each a one-line error naming the file or tensor, exit code 2, nothing under
--out and the input unchanged; a fit that gives non-finite values falls back, says so and records it."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from hcsmoe.checkpoints.architectures import architecture_for, moe_layers
from hcsmoe.checkpoints.loading import load_model
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_compress import file_digests

COMMON = ("-k", "4", "--method", "hc-smoe", "--no-eval", "-q", "--blocks", "2", "--block-size", "32")


def damaged_copy(tiny_models, tmp_path, damage) -> tuple:
    """A copy of a tiny checkpoint (in index + shards layout), damaged by `damage(directory)`."""
    source = tmp_path / "model"
    model = load_model(tiny_models["qwen3_moe"])
    model.save_pretrained(source, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((tiny_models["qwen3_moe"] / name).read_bytes())
    assert (source / "model.safetensors.index.json").is_file()
    damage(source)
    return source, file_digests(source)


def shard_of(directory, wanted: str):
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    return directory / next(file for key, file in weight_map.items() if wanted in key)


def truncate(directory):
    shard = shard_of(directory, "experts")
    shard.write_bytes(shard.read_bytes()[:-1000])


def remove_shard(directory):
    shard_of(directory, "experts").unlink()


def damage_expert_tensor(directory, change) -> None:
    """Rewrite the first routed-expert tensor of its shard through `change`."""
    shard = shard_of(directory, ".experts.")
    tensors = load_file(shard)
    key = next(k for k in sorted(tensors) if ".experts." in k)
    tensors[key] = change(tensors[key])
    save_file(tensors, shard, metadata={"format": "pt"})


def wrong_shape(directory):
    damage_expert_tensor(directory, lambda tensor: tensor[..., :-1].contiguous())


def nan_expert(directory):
    damage_expert_tensor(directory, lambda tensor: tensor.index_fill(0, torch.tensor([1]), float("nan")))


@pytest.mark.parametrize("damage, words", [
    (truncate, "is truncated"),
    (remove_shard, "which is not in"),
    (wrong_shape, "do not belong to this config.json"),
    (nan_expert, "NaN or Inf"),
])
@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_a_damaged_checkpoint_is_refused_before_any_work(capsys, tiny_models, tmp_path, damage, words, stream):
    source, before = damaged_copy(tiny_models, tmp_path, damage)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compress", str(source), *COMMON, stream, "--out", str(out))
    assert_one_line_error(code, err)
    assert code == 2 and words in err and "calibrating" not in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert file_digests(source) == before


def test_an_output_under_a_file_is_refused_before_any_work(capsys, tiny_models, tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    code, _, err = run_cli(capsys, "compress", str(tiny_models["olmoe"]), *COMMON, "--out", str(tmp_path / "a-file" / "out"))
    assert_one_line_error(code, err)
    assert code == 2 and "not a directory" in err


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tiny_models, tmp_path):
    """The process may write files of at most 64 KiB (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with EFBIG, as
    with a full disk): one line, exit 2, no partial output left beside the requested name."""
    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    out = tmp_path / "out"
    process = subprocess.run([sys.executable, "-m", "hcsmoe", "compress", str(tiny_models["olmoe"]), *COMMON,
                              "--out", str(out)], capture_output=True, text=True, preexec_fn=limited,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_line_error(process.returncode, "\n".join(l for l in process.stderr.splitlines() if "warn" not in l.lower()))
    assert process.returncode == 2 and "File too large" in process.stderr and "choose another --out" in process.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_fit_that_gives_nan_falls_back_says_so_and_is_recorded(tiny_models, capsys):
    """A damaged fitting target (NaN on some tokens) makes the refit's solution NaN: the layer keeps its
    down projections as the plan made them, one line says so, the plan records it; the model stays finite."""
    from hcsmoe.calibration.statistics import BlockTokens
    from hcsmoe.fitting.refit import RefitOptions
    from hcsmoe.fitting.router_fit import RouterFitOptions
    from hcsmoe.fitting.stage import fit_compressed_layer
    from hcsmoe.planners.plan import Group, LayerPlan
    from tests.test_fitting import first_moe, tokens_of

    _, architecture, moe = first_moe(tiny_models, "qwen3_moe")
    block = tokens_of(moe, architecture, n=300)
    routed = block.routed.clone()
    routed[5] = float("nan")
    damaged = BlockTokens(block.inputs, routed, block.scores, block.rest)
    plan = LayerPlan(0, moe.num_experts, [Group([e], [1.0], [0.1]) for e in range(1, moe.num_experts)])
    down = moe.experts.down_proj.detach().clone()
    fit_compressed_layer(moe, architecture, plan, None, damaged, torch.float32, RefitOptions(steps=2), None)
    assert torch.equal(moe.experts.down_proj, down)
    assert "fallback" in plan.details["refit"] and "refit gave non-finite values" in capsys.readouterr().err
