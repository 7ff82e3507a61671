"""Streaming (one layer at a time from the safetensors shards) against the in-memory path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hcsmoe.checkpoints.architectures import architecture_for, expert_parameters, moe_layers
from hcsmoe.calibration.statistics import Statistics
from hcsmoe.checkpoints.shards import CheckpointReader
from hcsmoe.checkpoints.loading import load_model
from hcsmoe.pipeline import compress
from hcsmoe.fitting.refit import RefitOptions
from hcsmoe.runners.streamed_model import StreamingCompressor
from hcsmoe.checkpoints.loading import skeleton
from tests.conftest import ARCHITECTURES

SMALL = dict(num_blocks=2, block_size=32, batch_size=1, progress=False)


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = saved_tensors(a), saved_tensors(b)
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    assert ca == cb


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streaming_writes_the_same_weights_as_the_in_memory_path(tiny_models, arch, tmp_path):
    k = 4 if arch.startswith("deepseek") else 5
    in_memory = compress(tiny_models[arch], num_experts=k, **SMALL)
    in_memory.save(tmp_path / "memory")
    streamed = compress(tiny_models[arch], num_experts=k, stream_to=tmp_path / "stream", **SMALL)
    assert streamed.model is None and streamed.saved == (tmp_path / "stream").resolve()
    assert [lp.groups for lp in streamed.plan.layers] == [lp.groups for lp in in_memory.plan.layers]
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")


def test_streaming_the_reference_model_is_bit_identical_and_reloads(reference_dir, tmp_path):
    options = dict(num_experts=16, num_blocks=4, block_size=128, batch_size=2, progress=False)
    compress(reference_dir, **options).save(tmp_path / "memory")
    compress(reference_dir, stream_to=tmp_path / "stream", **options)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    model = load_model(tmp_path / "stream")
    assert model.config.num_experts == 16
    assert moe_layers(model, architecture_for(model.config))[0].experts.gate_up_proj.shape[0] == 16


def test_statistics_are_the_same_streamed_or_in_memory(tiny_models, tmp_path):
    in_memory = compress(tiny_models["qwen2_moe"], num_experts=4, output_samples=8, **SMALL)
    streamed = compress(tiny_models["qwen2_moe"], num_experts=4, output_samples=8, stream_to=tmp_path / "s", **SMALL)
    for a, b in zip(in_memory.stats.layers, streamed.stats.layers):
        for name in ("mean_output", "counts", "mean_router_prob", "router_inputs", "reap", "ean", "sample_outputs"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_many_shards_with_an_index_reload_with_no_missing_keys(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr("hcsmoe.runners.streamed_model.shard_bytes_for", lambda source: 2**16)
    compress(tiny_models["mixtral"], num_experts=4, stream_to=tmp_path / "out", **SMALL)
    shards = sorted((tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "out" / "model.safetensors.index.json").is_file()
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # a sharded input streams too, and gives the same weights again
    compress(tmp_path / "out", num_experts=3, stream_to=tmp_path / "again", **SMALL)
    compress(tmp_path / "out", num_experts=3, **SMALL).save(tmp_path / "again-memory")
    assert_same_checkpoint(tmp_path / "again", tmp_path / "again-memory")


def test_interrupted_streaming_leaves_nothing(tiny_models, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StreamingCompressor, "write_moe_layer", fail)
    monkeypatch.setattr(StreamingCompressor, "write_compressed_moe_layer", fail)
    for method in (None, "hc-smoe"):  # the in-memory layer writer (default) and the chunked one
        with pytest.raises(KeyboardInterrupt):
            compress(tiny_models["qwen3_moe"], num_experts=4, method=method, stream_to=tmp_path / "out", **SMALL)
        assert list(tmp_path.iterdir()) == []


def test_replanning_from_a_statistics_file_streams_without_calibrating(tiny_models, tmp_path, monkeypatch):
    first = compress(tiny_models["olmoe"], num_experts=6, **SMALL)
    first.stats.save(tmp_path / "stats.safetensors")
    stats = Statistics.load(tmp_path / "stats.safetensors")
    monkeypatch.setattr("hcsmoe.runners.streaming.calibrate_layer", lambda *a, **k: pytest.fail("calibrated again"))
    replan = dict(SMALL, num_experts=3, method="hc-smoe", stats=stats)
    streamed = compress(tiny_models["olmoe"], stream_to=tmp_path / "s", **replan)
    compress(tiny_models["olmoe"], **replan).save(tmp_path / "m")
    assert_same_checkpoint(tmp_path / "s", tmp_path / "m")
    assert len(streamed.plan.layers[0].groups) == 3


def test_reader_gives_expert_slices_equal_to_the_loaded_parameters(tiny_models):
    model = load_model(tiny_models["mixtral"])
    reader = CheckpointReader(tiny_models["mixtral"], skeleton(model.config))
    moe = moe_layers(model, architecture_for(model.config))[1]
    for name, tensor in expert_parameters(moe.experts, 8).items():
        full = f"model.layers.1.mlp.experts.{name}"
        assert torch.equal(reader.tensor(full), tensor)
        assert torch.equal(reader.tensor(full, 2, 5), tensor[2:5])


def test_sequential_mode_sees_compressed_earlier_layers(tiny_models):
    plain = compress(tiny_models["qwen3_moe"], num_experts=3, **SMALL)
    sequential = compress(tiny_models["qwen3_moe"], num_experts=3, sequential=True, **SMALL)
    first_plain, first_sequential = plain.stats.layers[0], sequential.stats.layers[0]
    assert torch.equal(first_plain.mean_output, first_sequential.mean_output)  # the first layer's input is the same
    assert not torch.equal(plain.stats.layers[1].mean_output, sequential.stats.layers[1].mean_output)
    assert sequential.model.config.num_experts == 3


@pytest.mark.parametrize("mode, method, refit", [(True, "hc-smoe", None), ("corrective", None, None),
                                                 ("corrective", None, RefitOptions(steps=4))])
def test_sequential_streaming_writes_the_same_weights_as_in_memory(tiny_models, tmp_path, mode, method, refit):
    """Also with the expert fit (refit steps), which the in-memory path runs on the per-layer choice's kept
    winner and streaming on a rebuilt one."""
    options = dict(SMALL, num_experts=4, sequential=mode, method=method, refit=refit)
    compress(tiny_models["qwen2_moe"], **options).save(tmp_path / "memory")
    compress(tiny_models["qwen2_moe"], stream_to=tmp_path / "stream", **options)
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "memory")


def test_corrective_targets_the_original_models_layer_output(tiny_models):
    """Layer 0 is damaged (its routed experts silenced) and the stream goes on from it; layer 1's corrective
    target is the routed output that, added to what the rest of layer 1 gives on the damaged stream, makes
    the original model's layer-1 output."""
    from hcsmoe.runners.layerwise import calibrate_model
    from hcsmoe.checkpoints.loading import load_tokenizer
    from hcsmoe.calibration.text import calibration_blocks

    model = load_model(tiny_models["qwen3_moe"])
    architecture = architecture_for(model.config)
    ids = calibration_blocks(load_tokenizer(tiny_models["qwen3_moe"]), "wiki:en", 2, 32, 64)
    outputs = []
    hook = model.model.layers[1].register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        model(input_ids=ids)  # the original model's layer-1 output (the last hidden state is normalised)
    hook.remove()
    wanted = (outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]).reshape(-1, model.config.hidden_size)
    blocks = []

    def damage_first(moe, stats, block):
        blocks.append(block)
        if moe.index == 0:
            with torch.no_grad():
                moe.experts.down_proj.zero_()
        return True

    calibrate_model(model, architecture, ids, after_layer=damage_first, progress=False, corrective=True)
    second = blocks[1]
    assert torch.allclose(second.routed + second.rest, wanted, atol=1e-4)
    assert not torch.allclose(second.rest, wanted - blocks[0].routed, atol=1e-3)  # the damage reached layer 1


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_a_bf16_model_held_in_bf16_writes_the_same_weights_as_streaming(tmp_path, arch, monkeypatch):
    """The in-memory path holds a bf16 checkpoint in bf16 and computes one layer at a time in float32: the
    same bits as streaming (which reads each layer in float32), for the default recipe and for re-planning."""
    import hcsmoe.runners.in_memory
    from tests.conftest import make_tiny_model

    held = []
    load = hcsmoe.runners.in_memory.load_model
    monkeypatch.setattr(hcsmoe.runners.in_memory, "load_model", lambda path, dtype, device: held.append(dtype) or load(path, dtype, device))
    source = make_tiny_model(tmp_path / "bf16", arch, dtype=torch.bfloat16)
    k = 4 if arch.startswith("deepseek") else 5
    result = compress(source, num_experts=k, **SMALL)
    assert held == ["stored"] and {p.dtype for p in result.model.parameters()} == {torch.bfloat16}
    result.save(tmp_path / "memory")
    compress(source, num_experts=k, stream_to=tmp_path / "stream", **SMALL)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")
    replan = dict(SMALL, num_experts=k, method="hc-smoe", stats=result.stats)
    compress(source, **replan).save(tmp_path / "replan-memory")
    compress(source, stream_to=tmp_path / "replan-stream", **replan)
    assert_same_checkpoint(tmp_path / "replan-memory", tmp_path / "replan-stream")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loading_as_stored_gives_what_transformers_loads(tiny_models, arch):
    """The in-memory path loads tensor by tensor through our reader: the same parameters and buffers, and the
    same logits, as from_pretrained."""
    ours, theirs = load_model(tiny_models[arch], "stored"), load_model(tiny_models[arch], "float32")
    state, expected = ours.state_dict(), theirs.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name
    tokens = torch.arange(12)[None]
    assert torch.equal(ours(tokens).logits, theirs(tokens).logits)
