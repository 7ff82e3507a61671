"""Quantized checkpoints in, the same format out: FP8 blocks (DeepSeek-V3, Qwen3) and MXFP4 (GPT-OSS)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hcsmoe.checkpoints.formats import FP8_MAX, Fp8Blocks, Mxfp4, Stored
from hcsmoe.pipeline import compress
from tests.quantized import fp8_checkpoint, mxfp4_checkpoint, read_all
from tests.test_cli import assert_one_line_error, run_cli

CALIBRATION = dict(num_blocks=4, block_size=32, progress=False)
PER_EXPERT = re.compile(r"\.experts\.\d+\.")
FP8_STORED = Stored(("w", "w_scale_inv"), ("F8_E4M3", "F32"))


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    """DeepSeek-V3 in 16x16 FP8 blocks (kv_a_proj_with_mqa has 24 rows: a partial block, as 576 rows are in
    128-blocks in the released model), Qwen3-MoE in the released 128x128 blocks, GPT-OSS in MXFP4."""
    root = tmp_path_factory.mktemp("quantized")
    return {"deepseek_v3": fp8_checkpoint(root / "deepseek_v3", "deepseek_v3", (16, 16)),
            "qwen3_moe": fp8_checkpoint(root / "qwen3_moe", "qwen3_moe", (128, 128)),
            "gpt_oss": mxfp4_checkpoint(root / "gpt_oss")}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def fp8_rounding(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest error of e4m3 rounding: half a step (3 mantissa bits) of the value, or of the subnormal step."""
    return value.abs() * 2**-4 + scale * 2**-10


def expert_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for key, t in tensors.items() if ".experts." in key)


def test_fp8_blocks_round_trip_within_the_format_rounding():
    fmt = Fp8Blocks((16, 16))
    value = torch.randn(3, 24, 40) * torch.logspace(-3, 1, 40)  # partial blocks on both axes, wide range
    stored = fmt.encode("w", value, FP8_STORED)
    assert stored["w"].dtype == torch.float8_e4m3fn and stored["w_scale_inv"].shape == (3, 2, 3)
    assert torch.allclose(stored["w_scale_inv"][0, 0, 0], value[0, :16, :16].abs().max() / FP8_MAX)
    decoded = fmt.decode(FP8_STORED, [stored["w"], stored["w_scale_inv"]])
    scale = fmt._expand(stored["w_scale_inv"], value.shape)
    assert ((decoded - value).abs() <= fp8_rounding(value, scale)).all()
    assert (decoded - value).abs().max() > 0  # it did round


def test_mxfp4_round_trip_within_the_format_rounding():
    fmt = Mxfp4()
    value = torch.randn(2, 64, 48) * 0.02  # [E, in, out] as GPT-OSS holds gate_up_proj
    stored = fmt.encode("x", value, Stored((), ()))
    assert stored["x_blocks"].shape == (2, 48, 2, 16) and stored["x_scales"].shape == (2, 48, 2)
    decoded = fmt.decode(Stored(("x_blocks", "x_scales"), ("U8", "U8")),
                         [stored["x_blocks"], stored["x_scales"]])
    step = torch.exp2(stored["x_scales"].float() - 127)  # half the largest e2m1 step (2) at the block's exponent
    step = step.repeat_interleave(32, -1).transpose(-1, -2)
    assert decoded.shape == value.shape and ((decoded - value).abs() <= step).all()
    assert fmt.decode(Stored(("b", "s"), ("U8", "U8")),
                      list(fmt.encode("y", decoded, Stored((), ())).values())).equal(decoded)


@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streaming"])
@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "gpt_oss"])
def test_keeping_every_expert_reproduces_every_stored_tensor(quantized, tmp_path, family, stream):
    source, out = quantized[family], tmp_path / "out"
    result = compress(source, num_experts=8, method="reap", stream_to=out if stream else None, **CALIBRATION)
    if not stream:
        result.save(out)
    before, after = read_all(source), read_all(out)
    assert sorted(before) == sorted(after)
    assert all(same_bits(before[key], after[key]) for key in before)
    config_in, config_out = (json.loads((d / "config.json").read_text()) for d in (source, out))
    assert config_out["quantization_config"] == config_in["quantization_config"]
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_fewer_experts_shrink_the_experts_in_proportion_and_keep_kept_ones_bit_for_bit(quantized, tmp_path, family):
    source = quantized[family]
    before = read_all(source)
    pruned = compress(source, num_experts=4, method="reap", **CALIBRATION)
    pruned.save(tmp_path / "pruned")
    after = read_all(tmp_path / "pruned")
    assert expert_bytes(after) * 8 == expert_bytes(before) * 4
    for layer_plan in pruned.plan.layers:
        for slot, group in enumerate(layer_plan.groups):
            for key, tensor in after.items():
                if f".layers.{layer_plan.layer}." not in key or ".experts." not in key:
                    continue
                if f".experts.{slot}." in key:  # one tensor per expert (DeepSeek)
                    assert same_bits(tensor, before[key.replace(f".experts.{slot}.", f".experts.{group.members[0]}.")])
                elif ".experts.gate_up_proj_" in key or ".experts.down_proj_" in key:  # fused (GPT-OSS)
                    assert same_bits(tensor[slot], before[key][group.members[0]])


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_merged_experts_are_the_float32_merge_requantized(quantized, tmp_path, family):
    from hcsmoe.checkpoints.shards import StoredCheckpoint
    from hcsmoe.checkpoints.formats import format_of
    from hcsmoe.checkpoints.loading import load_config

    source = quantized[family]
    merged = compress(source, num_experts=4, method="hc-smoe", **CALIBRATION)
    merged.save(tmp_path / "merged")
    fmt = format_of(load_config(source))
    inputs, outputs = StoredCheckpoint(source, fmt), StoredCheckpoint(tmp_path / "merged", fmt)
    checked = 0
    for layer_plan in merged.plan.layers:
        for slot, group in enumerate(layer_plan.groups):
            for key in outputs.layout:
                if f".layers.{layer_plan.layer}." not in key or not fmt.is_encoded(outputs.layout[key]):
                    continue
                if f".experts.{slot}." in key:
                    members = [inputs.raw(key.replace(f".experts.{slot}.", f".experts.{m}.")) for m in group.members]
                    value = outputs.raw(key)
                elif ".experts." in key and not PER_EXPERT.search(key):
                    members = [inputs.raw(key, m, m + 1)[0] for m in group.members]
                    value = outputs.raw(key, slot, slot + 1)[0]
                else:
                    continue
                expected = sum(w * m for w, m in zip(group.weights, members))
                bound = (expected.abs() * 2**-4 + expected.abs().max() / FP8_MAX * 2**-9 if family != "gpt_oss"
                         else expected.abs().max())  # MXFP4: at most one step of the block's exponent
                assert ((value - expected).abs() <= bound + 1e-7).all(), key
                checked += len(group.members) > 1
    assert checked > 0


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_default_compressor_writes_the_same_bits_streaming_and_in_memory(quantized, tmp_path, family):
    source = quantized[family]
    compress(source, num_experts=4, **CALIBRATION).save(tmp_path / "memory")
    compress(source, num_experts=4, stream_to=tmp_path / "stream", **CALIBRATION)
    memory, stream = read_all(tmp_path / "memory"), read_all(tmp_path / "stream")
    assert sorted(memory) == sorted(stream)
    assert all(same_bits(memory[key], stream[key]) for key in memory)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()


def test_dtype_writes_dequantized_weights_without_the_quantization_config(quantized, tmp_path):
    source = quantized["qwen3_moe"]
    compress(source, num_experts=4, method="reap", dtype="bfloat16", **CALIBRATION).save(tmp_path / "bf16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    tensors = read_all(tmp_path / "bf16")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert not any(key.endswith("_scale_inv") for key in tensors)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def broken_copy(source: Path, target: Path, change) -> Path:
    from safetensors.torch import save_file

    target.mkdir()
    for path in source.iterdir():
        if path.suffix != ".safetensors":
            target.joinpath(path.name).write_bytes(path.read_bytes())
    tensors = read_all(source)
    change(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


SCALE = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
BREAKAGES = {
    "missing scale": lambda t: t.pop(SCALE),
    "wrong block shape": lambda t: t.__setitem__(SCALE, torch.ones(1, 1)),
    "missing MXFP4 scales": lambda t: t.pop("model.layers.0.mlp.experts.down_proj_scales"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_a_broken_scale_tensor_is_a_one_line_error_naming_it(quantized, tmp_path, capsys, breakage, stream):
    family = "gpt_oss" if "MXFP4" in breakage else "deepseek_v3"
    broken = broken_copy(quantized[family], tmp_path / "broken", BREAKAGES[breakage])
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "compress", str(broken), "-k", "4", "--out", str(out), "--no-eval", "-q",
                           "--blocks", "2", "--block-size", "32", stream)
    assert_one_line_error(code, err)
    assert ("down_proj" in err) and ("scale" in err)
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
