"""Narrower experts (--width): every routed expert keeps some of its neurons, chosen by least squares; the
checkpoint's intermediate width shrinks with them and loads in plain transformers."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from hcsmoe.apply.narrow import narrowed_expert, resolve_width
from hcsmoe.checkpoints.architectures import architecture_for, expert_width, moe_layers, width_fits
from hcsmoe.checkpoints.loading import load_model
from hcsmoe.errors import UserError
from hcsmoe.pipeline import compress
from hcsmoe.planners.plan import Group
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_compress import FAST, logits
from tests.test_streaming import assert_same_checkpoint


def test_all_neurons_is_no_narrowing_and_the_same_bits(tiny_models):
    plain = compress(tiny_models["qwen3_moe"], num_experts=4, fast=True, **FAST)
    for width in (1.0, 16):
        same = compress(tiny_models["qwen3_moe"], num_experts=4, fast=True, width=width, **FAST)
        assert same.plan.width is None
        for name, tensor in plain.model.state_dict().items():
            assert torch.equal(tensor, same.model.state_dict()[name]), name


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"])
def test_a_narrower_checkpoint_reloads_in_transformers_with_the_same_logits(tiny_models, tmp_path, family):
    """Fused and interleaved layouts, a bias (GPT-OSS), a shared expert kept as it is (Qwen2-MoE); streaming
    writes the same bits."""
    source = tiny_models[family]
    full = expert_width(moe_layers(load_model(source), architecture_for(load_model(source).config))[0].experts,
                        architecture_for(load_model(source).config))
    result = compress(source, num_experts=4, width=0.5, fast=True, **FAST)
    assert result.plan.width == full // 2 and all(layer.details["width"] == full // 2 for layer in result.plan.layers)
    result.save(tmp_path / "memory")
    config = json.loads((tmp_path / "memory" / "config.json").read_text())
    key = architecture_for(result.model.config).width_key
    assert config[key] == full // 2
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(reloaded.float().eval()), logits(result.model.float().eval()))
    compress(source, num_experts=4, width=0.5, fast=True, stream_to=tmp_path / "streamed", **FAST)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")


def test_duplicated_neurons_go_first(tiny_models):
    """An expert whose neurons 8-15 repeat neurons 0-7 (same gate/up rows, their own down columns): cut to 8 it
    keeps one of each pair, and its output is nearly the same on every token (a duplicate's down column is added
    to its twin's, up to the ridge)."""
    model = load_model(tiny_models["qwen3_moe"])
    architecture = architecture_for(model.config)
    experts = moe_layers(model, architecture)[0].experts
    hidden, half = experts.gate_up_proj.shape[2], experts.gate_up_proj.shape[1] // 4
    generator = torch.Generator().manual_seed(0)
    gate_up = torch.randn(4 * half, hidden, generator=generator)  # [gate; up]: gate rows 0-15, up rows 16-31
    gate_up[half : 2 * half] = gate_up[:half]
    gate_up[3 * half :] = gate_up[2 * half : 3 * half]
    tensors = {"gate_up_proj": gate_up, "down_proj": torch.randn(hidden, 2 * half, generator=generator)}
    stats = SimpleNamespace(router_inputs=torch.randn(400, hidden, generator=generator),
                            router_weight=torch.randn(3, hidden, generator=generator))
    narrowed = narrowed_expert(tensors, architecture, Group([0], [1.0], [1.0]), stats, 2, half, experts)
    kept = [next(i for i in range(2 * half) if torch.equal(row, gate_up[i])) for row in narrowed["gate_up_proj"][:half]]
    assert sorted(i % half for i in kept) == list(range(half))
    x = stats.router_inputs

    def output(gate_up, down):
        gate, up = gate_up.chunk(2)
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

    before, after = output(gate_up, tensors["down_proj"]), output(narrowed["gate_up_proj"], narrowed["down_proj"])
    assert float((after - before).norm() / before.norm()) < 0.02  # up to the ridge's pull toward the own columns


def test_width_as_fraction_or_count_and_refusals():
    assert resolve_width(0.5, 64) == 32 and resolve_width(40, 64) == 40 and resolve_width(1.0, 64) is None
    for bad in (0, -1, 1.5, 65):
        with pytest.raises(UserError):
            resolve_width(bad, 64)


def test_llama4_whose_shared_expert_shares_the_width_key_is_refused(capsys, tiny_models, tmp_path):
    code, _, err = run_cli(capsys, "compress", str(tiny_models["llama4_text"]), "-k", "8", "--width", "0.5", "--no-eval",
                           "-q", "--blocks", "2", "--block-size", "32", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err)
    assert "--width" in err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_narrows_by_raising_the_shared_count_so_its_shared_experts_stay(capsys, tiny_models, tmp_path, family):
    """DeepSeek's shared experts are moe_intermediate_size x n_shared_experts wide: half-width routed experts come
    with twice the shared count, and the checkpoint reloads in plain transformers with its shared experts unchanged."""
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "compress", str(tiny_models[family]), "-k", "8", "--width", "0.5", "--fast",
                           "--no-eval", "-q", "--blocks", "2", "--block-size", "32", "--out", str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["moe_intermediate_size"], config["n_shared_experts"]) == (8, 2)
    original, narrowed = (AutoModelForCausalLM.from_pretrained(path) for path in (tiny_models[family], out))
    for before, after in zip(original.model.layers[1:], narrowed.model.layers[1:]):
        assert after.mlp.experts.down_proj.shape[-1] == 8
        for name, tensor in before.mlp.shared_experts.state_dict().items():
            assert torch.equal(tensor, after.mlp.shared_experts.state_dict()[name]), name


def test_a_deepseek_width_must_divide_the_shared_experts_width():
    config = SimpleNamespace(model_type="deepseek_v3", moe_intermediate_size=64, n_shared_experts=1)
    architecture = architecture_for(config)
    assert width_fits(config, architecture, 32) and width_fits(config, architecture, 16)
    assert not width_fits(config, architecture, 48) and not width_fits(config, architecture, 40)


def test_width_only_keeps_every_expert(capsys, tiny_models, tmp_path):
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "compress", str(tiny_models["qwen3_moe"]), "-k", "8", "--width", "8", "--fast",
                           "--no-eval", "-q", "--blocks", "2", "--block-size", "32", "--out", str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == 8 and config["moe_intermediate_size"] == 8


def test_widths_come_in_multiples_engines_can_run():
    """transformers' grouped expert kernels need 16-byte rows (a width of 46 fails there), MXFP4 blocks of 32:
    a fraction rounds down to such a multiple, a count that is none is refused in one line."""
    assert resolve_width(0.72, 64) == 40 and resolve_width(0.05, 64) == 8 and resolve_width(0.75, 64) == 48
    assert resolve_width(0.5, 2880, multiple=32) == 1440 and resolve_width(0.3, 2880, multiple=32) == 864
    with pytest.raises(UserError, match="multiple of 8 neurons.*choose 40 or 48"):
        resolve_width(46, 64)
