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
REFERENCE_CALIBRATION = dict(num_blocks=32, block_size=256, progress=False)


def fitted_by_the_stage(name: str) -> bool:
    """Whether a state-dict entry is one the stage fits: an MoE layer's router (weight, bias) or routed experts."""
    return name.endswith(("gate.weight", ".router.weight", ".router.bias")) or ".experts." in name


def test_the_stage_lowers_the_held_out_divergence_and_moves_only_routers_and_routed_experts():
    """On the bundled reference model (real text), ten steps lower KL(original || compressed) on the held-out
    eighth of the calibration blocks; only the MoE layers' routers and routed experts change."""
    stage = DistillOptions(steps=10, lr=1e-4, batch=4)
    before = compress(None, num_experts=24, fast=True, **REFERENCE_CALIBRATION)
    after = compress(None, num_experts=24, fast=True, distill=stage, **REFERENCE_CALIBRATION)
    report = after.plan.distill
    assert report["options"] == stage.to_dict() and before.plan.distill is None and "fallback" not in report
    assert report["kl_after"] < 0.99 * report["kl_before"] and report["held_out_blocks"] == 4
    assert report["kept_step"] == report["steps_taken"] == stage.steps
    assert report["tokens"] == stage.steps * stage.batch * REFERENCE_CALIBRATION["block_size"]
    moved = {name for name, tensor in after.model.state_dict().items()
             if not torch.equal(tensor, before.model.state_dict()[name])}
    assert moved and all(fitted_by_the_stage(name) for name in moved), sorted(moved)
    assert any(".experts." in name for name in moved) and any(".experts." not in name for name in moved)


def test_a_stage_that_raises_the_held_out_divergence_keeps_the_layer_local_fits(tiny_models, capsys):
    """A step size far too large: the held-out divergence never falls, so the model is the one without the
    stage, bit for bit, and the run says so in one line."""
    without = compress(tiny_models["qwen3_moe"], num_experts=4, fast=True, **FAST)
    with_stage = compress(tiny_models["qwen3_moe"], num_experts=4, fast=True,
                          distill=DistillOptions(steps=3, lr=1.0, batch=2), **FAST)
    report = with_stage.plan.distill
    assert "fallback" in report and report["kept_step"] == 0 and report["kl_after"] == report["kl_before"]
    assert all(torch.equal(tensor, without.model.state_dict()[name]) for name, tensor in with_stage.model.state_dict().items())
    assert "end-to-end stage did not lower" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_the_stage_fits_every_router_and_routed_expert_and_nothing_else(tiny_models, arch):
    from transformers import AutoModelForCausalLM

    from hcsmoe.checkpoints.architectures import architecture_for
    from hcsmoe.fitting.distill import distilled_parameters

    model = AutoModelForCausalLM.from_pretrained(tiny_models[arch])
    fitted = {id(t) for t in distilled_parameters(model, architecture_for(model.config))}
    names = {name for name, p in model.named_parameters() if id(p) in fitted}
    assert names and all(fitted_by_the_stage(name) for name in names), sorted(names)
    assert {n for n, _ in model.named_parameters() if fitted_by_the_stage(n) and ".shared" not in n} == names
    assert not any("correction_bias" in name for name in names)


def test_the_stage_runs_on_the_calibration_blocks_sampled_once(tiny_models, monkeypatch):
    """With text sampled from the model (`self`), the stage fits on the very blocks the calibration ran on: the
    model is sampled once (not again from the float32 original, whose samples can differ from the held model's)."""
    import hcsmoe.calibration.text as text
    import hcsmoe.runners.in_memory as in_memory

    sampled, seen = [], {}
    sample, calibrate, stage = text.sampled_blocks, in_memory.calibrate_model, in_memory.distill
    monkeypatch.setattr(text, "sampled_blocks", lambda *a, **k: sampled.append(1) or sample(*a, **k))
    monkeypatch.setattr(in_memory, "calibrate_model",
                        lambda model, arch, blocks, **k: seen.setdefault("calibration", blocks) is None
                        or calibrate(model, arch, blocks, **k))
    monkeypatch.setattr(in_memory, "distill",
                        lambda model, teacher, arch, blocks, *a: seen.setdefault("stage", blocks) is None
                        or stage(model, teacher, arch, blocks, *a))
    compress(tiny_models["qwen3_moe"], num_experts=4, fast=True, calibration="wiki:en+self",
             distill=DistillOptions(steps=2, lr=1e-4, batch=2), **FAST)
    assert len(sampled) == 1 and torch.equal(seen["stage"], seen["calibration"])


def test_the_plan_redoes_the_stage_and_the_input_model_is_left_as_it_was(tmp_path):
    """A model object in (its weights and flags untouched), a plan out; re-applying the plan to the checkpoint
    redoes the stage: the same model."""
    from hcsmoe.checkpoints.loading import REFERENCE_MODEL, load_model, load_tokenizer

    original = load_model(REFERENCE_MODEL)
    original.requires_grad_(True)
    kept = {name: tensor.clone() for name, tensor in original.state_dict().items()}
    stage = DistillOptions(steps=4, lr=1e-4, batch=4)
    from_object = compress(original, num_experts=24, fast=True, distill=stage, tokenizer=load_tokenizer(REFERENCE_MODEL),
                           **REFERENCE_CALIBRATION)
    assert "fallback" not in from_object.plan.distill
    assert all(torch.equal(tensor, kept[name]) for name, tensor in original.state_dict().items())
    assert all(p.requires_grad for p in original.parameters()) and not original.training
    result = compress(REFERENCE_MODEL, num_experts=24, fast=True, distill=stage, **REFERENCE_CALIBRATION)
    assert "fallback" not in result.plan.distill
    result.plan.save(tmp_path / "plan.json")
    reapplied = compress(REFERENCE_MODEL, plan=Plan.load(tmp_path / "plan.json"), **REFERENCE_CALIBRATION)
    assert reapplied.plan.distill == result.plan.distill
    assert torch.equal(logits(reapplied.model), logits(result.model))


def test_the_stage_writes_the_same_bits_at_any_thread_count(capsys, tmp_path):
    threads = torch.get_num_threads()
    written = {}
    try:
        for count in (1, 2):
            out = tmp_path / str(count)
            code, _, err = run_cli(capsys, "compress", "-k", "24", "--fast", "--no-eval", "-q", "--blocks", "32",
                                   "--block-size", "256", "--distill-steps", "4", "--threads", str(count),
                                   "--out", str(out))
            assert code == 0, err
            written[count] = digests(out)
    finally:
        torch.set_num_threads(threads)
    assert written[1] == written[2] and "model.safetensors" in written[1]
    card = (tmp_path / "1" / "README.md").read_text()
    assert "end-to-end stage (--distill-steps)" in card and "fallback" not in card


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
