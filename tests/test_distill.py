"""The end-to-end stage (--distill-steps, hcsmoe/fitting/distill.py): every MoE layer's router and routed experts
fitted together to the original's next-token distribution, after the layer-local fits."""

from __future__ import annotations

import pytest
import torch

from hcsmoe.errors import UserError
from hcsmoe.fitting.distill import DistillOptions
from hcsmoe.pipeline import compress
from hcsmoe.planners.plan import Plan
from hcsmoe.recipe import Recipe, read_yaml
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_compress import FAST, logits
from tests.test_resume import digests

STAGE = DistillOptions(steps=6, lr=1e-3, batch=2)


def fitted_by_the_stage(name: str) -> bool:
    """Whether a state-dict entry is one the stage fits: an MoE layer's router weight or routed experts."""
    return name.endswith("gate.weight") or name.endswith(".router.weight") or ".experts." in name


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_the_stage_lowers_the_divergence_and_moves_only_routers_and_routed_experts(tiny_models, arch):
    before = compress(tiny_models[arch], num_experts=4, fast=True, **FAST)
    after = compress(tiny_models[arch], num_experts=4, fast=True, distill=STAGE, **FAST)
    report = after.plan.distill
    assert report["options"] == STAGE.to_dict() and before.plan.distill is None
    assert report["kl_after"] < report["kl_before"]
    assert report["tokens"] == STAGE.steps * STAGE.batch * FAST["block_size"]
    moved = {name for name, tensor in after.model.state_dict().items()
             if not torch.equal(tensor, before.model.state_dict()[name])}
    assert moved and all(fitted_by_the_stage(name) for name in moved), sorted(moved)
    assert any("experts" in name for name in moved) and any(".experts." not in name for name in moved)


def test_the_plan_redoes_the_stage_and_the_input_model_is_left_as_it_was(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM

    from hcsmoe.checkpoints.loading import load_tokenizer

    original = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3_moe"])
    kept = {name: tensor.clone() for name, tensor in original.state_dict().items()}
    result = compress(original, num_experts=4, fast=True, distill=STAGE,
                      tokenizer=load_tokenizer(tiny_models["qwen3_moe"]), **FAST)
    assert all(torch.equal(tensor, kept[name]) for name, tensor in original.state_dict().items())
    assert all(p.requires_grad for p in original.parameters())
    result.plan.save(tmp_path / "plan.json")
    reapplied = compress(tiny_models["qwen3_moe"], plan=Plan.load(tmp_path / "plan.json"), **FAST)
    assert reapplied.plan.distill == result.plan.distill
    assert torch.equal(logits(reapplied.model), logits(result.model))


def test_the_stage_writes_the_same_bits_at_any_thread_count(capsys, tiny_models, tmp_path):
    threads = torch.get_num_threads()
    written = {}
    try:
        for count in (1, 2):
            out = tmp_path / str(count)
            code, _, err = run_cli(capsys, "compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--fast", "--no-eval",
                                   "-q", "--blocks", "4", "--block-size", "32", "--distill-steps", "3",
                                   "--threads", str(count), "--out", str(out))
            assert code == 0, err
            written[count] = digests(out)
    finally:
        torch.set_num_threads(threads)
    assert written[1] == written[2] and "model.safetensors" in written[1]


def test_streaming_refuses_the_stage_in_one_line(capsys, tiny_models, tmp_path):
    code, _, err = run_cli(capsys, "compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--stream", "--no-eval",
                           "--distill-steps", "3", "--out", str(tmp_path / "out"))
    assert_one_line_error(code, err)
    assert "--no-stream" in err and not (tmp_path / "out").exists()


def test_the_stage_options_are_checked(tmp_path):
    with pytest.raises(UserError, match="--distill-steps"):
        Recipe.from_options({"distill_lr": 1e-3})
    with pytest.raises(UserError, match="positive"):
        Recipe.from_options({"distill_steps": -2})
    assert Recipe.from_options({"distill_steps": 0}).distill is None
    (tmp_path / "recipe.yaml").write_text("distill-steps: 50\ndistill-lr: 0.0003\n")
    assert Recipe.from_options(read_yaml(tmp_path / "recipe.yaml")).distill == DistillOptions(steps=50, lr=3e-4)
