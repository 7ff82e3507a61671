"""Family-specific properties: routing as the model routes, layouts, biases, group limits, untouched parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from hcsmoe.checkpoints.architectures import (
    architecture_for,
    check_k_for,
    dense_layers,
    expert_intermediate,
    expert_output_from_intermediate,
    moe_layers,
    route,
    shared_modules,
)
from hcsmoe.cli import main
from hcsmoe.cli.inspect import describe
from hcsmoe.errors import UserError
from hcsmoe.checkpoints.loading import load_tokenizer
from hcsmoe.pipeline import compress
from hcsmoe.planners.plan import Group, LayerPlan, Plan
from tests.conftest import ARCHITECTURES, TINY_CONFIGS

FAST = dict(num_blocks=4, block_size=64, progress=False)
OLD_TRANSFORMERS = Path(__file__).parent.parent / ".ci" / "transformers-4.57"
# The config attribute transformers 4.57's modeling code reads the routed-expert count from (its configuration_*.py).
COUNT_KEY_IN_4_57 = {
    "qwen3_moe": "num_experts", "qwen2_moe": "num_experts", "mixtral": "num_local_experts", "olmoe": "num_experts",
    "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts", "gpt_oss": "num_local_experts",
    "phimoe": "num_local_experts", "granitemoe": "num_local_experts", "granitemoeshared": "num_local_experts",
    "llama4_text": "num_local_experts",
}
SIGMOID_SCORED = {"deepseek_v3", "llama4_text"}  # their routers gate with sigmoid scores, the others with softmax

# What `hcsmoe inspect` must find in each tiny model: dense layers, shared modules, router tensors beyond `weight`.
LAYOUTS = {
    "qwen3_moe": ([], [], []),
    "qwen2_moe": ([], ["mlp.shared_expert", "mlp.shared_expert_gate"], []),
    "mixtral": ([], [], []),
    "olmoe": ([], [], []),
    "deepseek_v2": ([0], ["mlp.shared_experts"], []),
    "deepseek_v3": ([0], ["mlp.shared_experts"], ["mlp.gate.e_score_correction_bias"]),
    "gpt_oss": ([], [], ["mlp.router.bias"]),
    "phimoe": ([], [], []),
    "granitemoe": ([], [], []),
    "granitemoeshared": ([], ["shared_mlp"], []),
    "llama4_text": ([0, 2], ["feed_forward.shared_expert"], []),
}


def deepseek_config(model_type: str, **changes):
    config = TINY_CONFIGS[model_type]()
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_group_limited_routing_refuses_k_not_divisible_by_n_group(model_type):
    config = deepseek_config(model_type)  # 8 experts in 2 groups, 1 group per token, top-2: K in {4, 6, 8}
    architecture = architecture_for(config)
    for k in (4, 6, 8):
        check_k_for(config, architecture, k)
    with pytest.raises(UserError) as error:
        check_k_for(config, architecture, 5)
    message = str(error.value)
    assert "\n" not in message and "multiple of 2" in message and message.endswith("nearest valid K: 4 or 6")
    with pytest.raises(UserError, match=r"nearest valid K: 4$"):
        check_k_for(config, architecture, 3)  # 3 experts cannot be split into 2 groups, and 2 leave 1 per group
    with pytest.raises(UserError, match=r"at least 3 experts per group; nearest valid K: 6$"):  # top-3 in 1 group
        check_k_for(deepseek_config(model_type, num_experts_per_tok=3), architecture, 4)


def test_compress_refuses_k_the_group_limit_cannot_route_before_any_work(capsys, tiny_models, tmp_path):
    args = ["compress", str(tiny_models["deepseek_v3"]), "-k", "5", "--out", str(tmp_path / "out"), "--no-eval", "-q"]
    code = main(args)
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and err.strip().endswith("nearest valid K: 4 or 6")
    assert not (tmp_path / "out").exists()


def test_deepseek_v2_greedy_routing_ignores_groups():
    config = deepseek_config("deepseek_v2", topk_method="greedy")  # V2-Lite style: groups unused, any K works
    check_k_for(config, architecture_for(config), 5)


def test_deepseek_v3_needs_two_experts_per_group():
    """V3 scores a group by the sum of its best two experts, so one expert per group cannot run."""
    config = deepseek_config("deepseek_v3", n_group=4, topk_group=2)
    with pytest.raises(UserError, match=r"at least 2 experts per group; nearest valid K: 8$"):
        check_k_for(config, architecture_for(config), 4)


def routed_output(moe, architecture, x: torch.Tensor) -> torch.Tensor:
    """The routed experts' part of the block output, rebuilt from the adapter's routing and expert compute."""
    _, weights, indices = route(moe, architecture, x)
    out = torch.zeros_like(x)
    for slot in range(indices.shape[1]):
        for expert in indices[:, slot].unique().tolist():
            tokens = (indices[:, slot] == expert).nonzero(as_tuple=True)[0]
            w = weights[tokens, slot].float().unsqueeze(-1)
            if architecture.gate_on_input:  # Llama 4 scales the expert's input, not its output
                h = expert_intermediate(moe.experts, architecture, x[tokens] * w)[expert : expert + 1]
                out[tokens] += expert_output_from_intermediate(moe.experts, architecture, h, [expert])[0]
            else:
                h = expert_intermediate(moe.experts, architecture, x[tokens])[expert : expert + 1]
                out[tokens] += w * expert_output_from_intermediate(moe.experts, architecture, h, [expert])[0]
    return out


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_calibration_routing_and_expert_compute_match_the_model(tiny_models, arch):
    """route() picks the experts and gate weights the model's own MoE block uses, and expert_intermediate /
    expert_output_from_intermediate compute what its experts compute (layout, activation, biases)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    architecture = architecture_for(model.config)
    with torch.no_grad():
        for module in shared_modules(model, architecture).values():  # shared parts add their own output
            for param in module.parameters():
                param.zero_()
        moe = moe_layers(model, architecture)[-1]
        x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 20
        block_out = moe.block(x.unsqueeze(0))
        block_out = (block_out[0] if isinstance(block_out, tuple) else block_out).reshape(x.shape)
        scores, weights, indices = route(moe, architecture, x)
        rebuilt = routed_output(moe, architecture, x)
    assert scores.dtype == torch.float32 and scores.shape == (64, 8) and indices.shape == weights.shape
    assert indices.unique().numel() > 2  # routing really varies over the tokens
    assert torch.allclose(scores.sum(-1), torch.ones(64)) == (arch not in SIGMOID_SCORED)
    assert torch.allclose(rebuilt, block_out, rtol=1e-4, atol=1e-4 * float(block_out.abs().max()))
    if arch == "gpt_oss":  # the input is large enough that the SwiGLU clamp is exercised
        h = x @ moe.experts.gate_up_proj[0].detach() + moe.experts.gate_up_proj_bias[0].detach()
        assert float(h.abs().max()) > moe.experts.limit


def shared_and_dense_keys(model, architecture) -> list[str]:
    """State-dict keys of the shared modules (shared experts, their gates, shared MLPs) and the dense layers' MLPs."""
    prefixes = [f"{name}." for name in shared_modules(model, architecture)]
    prefixes += [f"{architecture.layers}.{i}.{architecture.moe_block}." for i in dense_layers(model, architecture)]
    return [key for key in model.state_dict() if key.startswith(tuple(prefixes))]


def routed_prefixes(model, architecture) -> tuple[str, ...]:
    """State-dict prefixes of every MoE layer's router and routed experts."""
    names = {module: name for name, module in model.named_modules()}
    return tuple(f"{names[m]}." for moe in moe_layers(model, architecture) for m in (moe.router, moe.experts))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_everything_but_routed_experts_and_routers_is_untouched(tiny_models, arch):
    """Shared experts, shared_expert_gate, shared MLPs, dense layers, attention, norms: bit for bit as before."""
    original = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    result = compress(tiny_models[arch], num_experts=4, **FAST)
    before, after = original.state_dict(), result.model.state_dict()
    kept = [key for key in before if not key.startswith(routed_prefixes(original, result.architecture))]
    assert kept and all(torch.equal(before[key], after[key]) for key in kept)
    dense, shared, _ = LAYOUTS[arch]
    special = shared_and_dense_keys(original, result.architecture)
    assert bool(special) == bool(dense or shared) and set(special) <= set(kept)
    # no cached count of 8 experts is left in the modules (one-hot sizes, group views, out_features) or the config
    for moe in moe_layers(result.model, result.architecture):
        for module in (moe.block, moe.router, moe.experts):
            assert not [name for name, value in vars(module).items() if value == 8 and isinstance(value, int)], module
    assert not [key for key, value in result.model.config.to_dict().items() if "expert" in key and value == 8]


def identical_expert_plan(layer_indices: list[int], merge: str, router: str) -> Plan:
    """Experts 0, 1, 2 merged (weights 0.2, 0.3, 0.5), the others kept: 6 experts per layer."""
    groups = [Group([0, 1, 2], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5])] + [Group([e], [1.0], [0.1]) for e in range(3, 8)]
    layers = [LayerPlan(layer, 8, groups) for layer in layer_indices]
    return Plan(method="manual", options={}, router=router, layers=layers, merge=merge)


@pytest.mark.parametrize("merge, router", [("weighted", "average"), ("fix-dom", "lsq")])
def test_gpt_oss_group_of_identical_experts_with_biases_is_that_expert(tiny_models, merge, router):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt_oss"]).eval()
    architecture = architecture_for(model.config)
    layers = moe_layers(model, architecture)
    with torch.no_grad():
        for moe in layers:
            for tensor in moe.experts.parameters():
                tensor[1:3] = tensor[0]  # experts 1 and 2 become copies of expert 0, biases included
    plan = identical_expert_plan([m.index for m in layers], merge, router)
    result = compress(model, plan=plan, tokenizer=load_tokenizer(tiny_models["gpt_oss"]), **FAST)
    for old, new in zip(layers, moe_layers(result.model, architecture)):
        for name, tensor in old.experts.named_parameters():
            merged = getattr(new.experts, name)
            assert merged.shape[0] == 6 and torch.allclose(merged[0], tensor[0], atol=1e-6), name
            assert torch.equal(merged[1:], tensor[3:]), name
        weights = torch.tensor([0.2, 0.3, 0.5])
        assert torch.allclose(new.router.bias[0], weights @ old.router.bias[:3])  # lsq too: the bias is averaged
        assert torch.equal(new.router.bias[1:], old.router.bias[3:])
        assert new.experts.num_experts == new.router.num_experts == 6


@pytest.mark.parametrize("router", ["average", "dominant"])
def test_e_score_correction_bias_gets_one_entry_per_group_like_the_router_rows(tiny_models, tmp_path, router):
    original = AutoModelForCausalLM.from_pretrained(tiny_models["deepseek_v3"])
    result = compress(tiny_models["deepseek_v3"], num_experts=4, router=router, router_fit=False, **FAST)
    architecture = result.architecture
    for old, new, layer_plan in zip(moe_layers(original, architecture), moe_layers(result.model, architecture),
                                    result.plan.layers):
        bias, rows = old.router.e_score_correction_bias, old.router.weight
        assert new.router.e_score_correction_bias.shape == (4,) and new.router.weight.shape == (4, 32)
        for g, group in enumerate(layer_plan.groups):
            if router == "dominant":
                best = group.members[max(range(len(group.members)), key=lambda i: (group.frequencies[i], -group.members[i]))]
                assert new.router.e_score_correction_bias[g] == bias[best] and torch.equal(new.router.weight[g], rows[best])
            else:
                weights = torch.tensor(group.weights)
                assert torch.allclose(new.router.e_score_correction_bias[g], weights @ bias[group.members])
                assert torch.allclose(new.router.weight[g], weights @ rows[group.members])
        assert new.router.num_experts == new.experts.num_experts == 4
    assert result.model.config.n_routed_experts == 4
    out = result.save(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(m.router.e_score_correction_bias.shape == (4,) for m in moe_layers(reloaded, architecture))


@pytest.mark.skipif(not OLD_TRANSFORMERS.is_dir(), reason=f"transformers 4.57 is not installed in {OLD_TRANSFORMERS} "
                    "(.ci/run installs it there)")
def test_saved_configs_load_in_transformers_4_57(tiny_models, tmp_path):
    """Every family exists in 4.57 too: its config class must read K from the saved config.json."""
    saved = {}
    for arch in ARCHITECTURES:
        result = compress(tiny_models[arch], num_experts=6, **FAST)
        saved[arch] = (str(result.save(tmp_path / arch)), [*result.architecture.count_keys, COUNT_KEY_IN_4_57[arch]])
    script = (
        "import json, sys, transformers\n"
        "from transformers import AutoConfig\n"
        "found = {'version': transformers.__version__}\n"
        "for arch, (path, keys) in json.loads(sys.argv[1]).items():\n"
        "    config = AutoConfig.from_pretrained(path)\n"
        "    found[arch] = [config.model_type, {key: getattr(config, key, None) for key in keys}]\n"
        "print(json.dumps(found))\n"
    )
    process = subprocess.run([sys.executable, "-c", script, json.dumps(saved)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(OLD_TRANSFORMERS), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert process.returncode == 0, process.stderr
    found = json.loads(process.stdout.strip().splitlines()[-1])
    assert found.pop("version").startswith("4.57.")
    for arch, (model_type, counts) in found.items():
        assert model_type == arch and all(count == 6 for count in counts.values()), (arch, counts)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_inspect_shows_each_family_layout(capsys, tiny_models, arch):
    info = describe(str(tiny_models[arch]))
    dense, shared, router_extra = LAYOUTS[arch]
    config = AutoConfig.from_pretrained(tiny_models[arch])
    assert info["dense_layers"] == dense and info["shared_modules"] == shared
    assert sorted(info["moe_layers"] + dense) == list(range(config.num_hidden_layers))
    assert info["experts_per_layer"] == 8 and all(shape[0] == 8 for shape in info["expert_tensors"].values())
    assert any(name.endswith(".gate_up_proj") for name in info["expert_tensors"])
    assert [n for n in info["router_tensors"] if not n.endswith(".weight")] == router_extra
    assert info["valid_k"] == ("4, 6, 8" if arch.startswith("deepseek") else "2 to 8")
    if arch == "gpt_oss":
        assert {"mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias"} <= set(info["expert_tensors"])
        assert "interleaved" in info["expert_layout"] and "transposed" in info["expert_layout"]
    code = main(["inspect", str(tiny_models[arch])])
    out = capsys.readouterr().out
    assert code == 0 and "expert tensors:" in out and info["architecture"] in out


def test_compress_on_an_unsupported_architecture_names_every_supported_family(capsys, tmp_path):
    dense = tmp_path / "llama"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(dense)
    code = main(["compress", str(dense), "-k", "2", "--out", str(tmp_path / "out"), "--no-eval", "-q"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "'llama'" in err
    for family in ("DeepSeek-V2", "DeepSeek-V3", "GPT-OSS", "Phi-MoE", "GraniteMoE", "GraniteMoeShared", "Llama 4",
                   "Qwen3-MoE", "Qwen2-MoE", "Mixtral", "OLMoE"):
        assert family in err


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
@pytest.mark.parametrize("method", ["hc-smoe", "reap"])
def test_group_limited_models_are_planned_within_each_routing_group(tiny_models, arch, method):
    """Merged expert g must sit in routing group g // (K / n_group) and be made of that group's experts."""
    result = compress(tiny_models[arch], num_experts=4, method=method, num_blocks=2, block_size=32, progress=False)
    assert result.plan.options["routing_groups"] == 2
    for layer_plan in result.plan.layers:
        for position, group in enumerate(layer_plan.groups):
            assert {m // 4 for m in group.members} == {position // 2}, (position, group.members)
