"""The HC-SMoE pipeline on tiny random models of every supported architecture."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.cluster.hierarchy import fcluster, linkage
from transformers import AutoModelForCausalLM

from hcsmoe.checkpoints.architectures import architecture_for, moe_layers
from hcsmoe.apply.layer import merge_rows
from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.pipeline import compress
from hcsmoe.fitting.refit import RefitOptions
from hcsmoe.planners.clustering import HCSMoE, groups_from_linkage
from hcsmoe.planners.plan import Group, Plan
from tests.conftest import ARCHITECTURES

INPUT = torch.arange(40).remainder(997).mul(37).remainder(8000).view(2, 20)
FAST = dict(num_blocks=4, block_size=64, progress=False)


# torch's CPU grouped_mm (transformers' default experts kernel) rounds differently depending on the weights'
# address mod 16 bytes when it gets them transposed, and a checkpoint's tensors load as views into the file at
# arbitrary 8-byte offsets. Logits are therefore compared with every tensor moved to freshly allocated
# (64-byte aligned) memory: equal weights then give equal logits, whatever the load path.
FRESH_MEMORY = "for t in [*m.parameters(), *m.buffers()]: t.data = t.data.clone()"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
        return model(input_ids=INPUT).logits


def expert_params(model) -> int:
    arch = architecture_for(model.config)
    return sum(p.numel() for m in moe_layers(model, arch) for p in list(m.experts.parameters()) + list(m.router.parameters()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_keeping_every_expert_is_bit_identical(tiny_models, arch):
    original = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    result = compress(tiny_models[arch], num_experts=8, **FAST)
    assert all(len(lp.groups) == 8 for lp in result.plan.layers)
    before, after = original.state_dict(), result.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(result.model), logits(original))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_saved_model_reloads_identically_and_is_smaller(tiny_models, arch, tmp_path):
    source = tiny_models[arch]
    original = AutoModelForCausalLM.from_pretrained(source)
    result = compress(source, num_experts=6, **FAST)  # 6: valid for DeepSeek's 2 expert groups too
    out = result.save(tmp_path / "out")
    expected = logits(result.model)

    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], output_loading_info=True)\n"
        "assert not info['missing_keys'] and not info['unexpected_keys'], info\n"
        f"{FRESH_MEMORY}\n"
        "with torch.no_grad(): torch.save(m(input_ids=torch.load(sys.argv[2])).logits, sys.argv[3])\n"
    )
    torch.save(INPUT, tmp_path / "input.pt")
    subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "input.pt"), str(tmp_path / "logits.pt")],
                   check=True, capture_output=True)
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    per_expert = expert_params(original) // (8 * len(result.plan.layers))
    removed = 2 * len(result.plan.layers)
    assert sum(p.numel() for p in original.parameters()) - sum(p.numel() for p in reloaded.parameters()) == removed * per_expert
    config = json.loads((out / "config.json").read_text())
    assert all(config[key] == 6 for key in result.architecture.count_keys)
    saved, before = load_file(str(out / "model.safetensors")), load_file(str(source / "model.safetensors"))
    dropped = set(before) - set(saved)  # per-expert naming (Qwen, Mixtral, OLMoE, DeepSeek, Phi-MoE): experts 6, 7
    shrunk = {k for k in saved if saved[k].shape != before[k].shape}  # fused [E, ...] tensors (GPT-OSS, Granite, Llama 4)
    assert set(saved) <= set(before) and (dropped or shrunk)
    assert all(".experts.6." in k or ".experts.7." in k for k in dropped)
    assert all(before[k].shape[0] == 8 and saved[k].shape == (6, *before[k].shape[1:]) for k in shrunk)
    assert (out / "hcsmoe_plan.json").is_file() and (out / "README.md").is_file()
    assert result.plan.refit is not None and all("refit" in lp.details for lp in result.plan.layers)


def test_hc_smoe_saves_its_dendrograms(tiny_models, tmp_path):
    out = compress(tiny_models["olmoe"], num_experts=4, method="hc-smoe", **FAST).save(tmp_path / "out")
    assert (out / "dendrograms.png").is_file()
    plan = json.loads((out / "hcsmoe_plan.json").read_text())
    assert plan["method"] == "hc-smoe" and plan["refit"] is None and plan["router_fit"] is None


def test_shared_expert_is_untouched(tiny_models):
    original = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2_moe"])
    result = compress(tiny_models["qwen2_moe"], num_experts=4, **FAST)
    before = {k: v for k, v in original.state_dict().items() if "shared_expert" in k}
    after = result.model.state_dict()  # shared_expert_gate included
    assert before and all(torch.equal(after[k], v) for k, v in before.items())


def stats_from_outputs(outputs: np.ndarray, counts=None) -> LayerStats:
    e = outputs.shape[0]
    counts = torch.ones(e) if counts is None else torch.tensor(counts, dtype=torch.float32)
    return LayerStats(0, torch.tensor(outputs, dtype=torch.float32), counts, torch.full((e,), 1 / e), torch.zeros(0))


@pytest.mark.parametrize("method", ["average", "single", "complete", "ward"])
def test_clustering_matches_scipy_and_returns_exactly_k(method):
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(c, 0.1, size=(4, 3)) for c in (0.0, 5.0, 10.0)])
    tree = linkage(points, method=method)
    plan = HCSMoE(linkage=method).plan_layer(stats_from_outputs(points), 3)
    assert np.allclose(plan.details["linkage_matrix"], tree)
    labels = fcluster(tree, 3, criterion="maxclust")
    assert sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in set(labels)) == [g.members for g in plan.groups]
    for k in range(1, 13):
        assert len(HCSMoE(linkage=method).plan_layer(stats_from_outputs(points), k).groups) == k


def test_exactly_k_even_when_distances_tie():
    points = np.zeros((6, 2))  # every distance is zero: fcluster's criterion would return one cluster
    tree = linkage(points, method="average")
    assert len(set(fcluster(tree, 4, criterion="maxclust"))) != 4
    assert len(groups_from_linkage(tree, 6, 4)) == 4


def test_frequency_weights_sum_to_one_and_follow_frequency():
    points = np.array([[0.0], [0.1], [5.0], [5.2]])
    plan = HCSMoE().plan_layer(stats_from_outputs(points, counts=[3, 1, 0, 0]), 2)
    first, second = plan.groups
    assert first.members == [0, 1] and first.weights == pytest.approx([0.75, 0.25])
    assert second.weights == pytest.approx([0.5, 0.5])  # never routed: plain average
    assert all(sum(g.weights) == pytest.approx(1.0) for g in plan.groups)


def test_merging_identical_experts_gives_that_expert():
    expert = torch.randn(1, 6, 4)
    tensor = torch.cat([expert, expert, expert, torch.randn(1, 6, 4)])
    merged = merge_rows(tensor, [Group([0, 1, 2], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]), Group([3], [1.0], [1.0])])
    assert torch.allclose(merged[0], expert[0], atol=1e-7) and torch.equal(merged[1], tensor[3])


def test_same_seed_same_groups_and_bit_identical_weights(tiny_models):
    a = compress(tiny_models["qwen3_moe"], num_experts=4, seed=3, **FAST)
    b = compress(tiny_models["qwen3_moe"], num_experts=4, seed=3, **FAST)
    assert a.plan.to_dict() == b.plan.to_dict()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_plan_round_trips_through_json(tiny_models, tmp_path):
    result = compress(tiny_models["mixtral"], num_experts=4, **FAST)
    result.plan.save(tmp_path / "plan.json")
    reapplied = compress(tiny_models["mixtral"], plan=Plan.load(tmp_path / "plan.json"), **FAST)
    assert reapplied.plan.refit == result.plan.refit and reapplied.plan.router_fit == result.plan.router_fit
    assert torch.equal(logits(reapplied.model), logits(result.model))  # the fits recorded in the plan, redone
    published = compress(tiny_models["mixtral"], num_experts=4, method="hc-smoe", **FAST)
    published.plan.save(tmp_path / "hc.json")
    replanned = compress(tiny_models["mixtral"], plan=Plan.load(tmp_path / "hc.json"), stats=published.stats,
                         progress=False)
    assert torch.equal(logits(replanned.model), logits(published.model))


@pytest.mark.parametrize("router", ["lsq", "average", "dominant"])
def test_router_has_one_row_per_group(tiny_models, router):
    result = compress(tiny_models["olmoe"], num_experts=3, router=router, **FAST)
    for moe in moe_layers(result.model, result.architecture):
        assert moe.router.weight.shape[0] == 3 and moe.experts.gate_up_proj.shape[0] == 3


def file_digests(directory) -> dict[str, str]:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_input_checkpoint_is_never_modified(tiny_models, tmp_path):
    source = tiny_models["qwen2_moe"]
    before = file_digests(source)
    compress(source, num_experts=4, **FAST).save(tmp_path / "out")
    assert file_digests(source) == before


def test_interrupted_save_leaves_nothing_under_the_requested_name(tiny_models, tmp_path, monkeypatch):
    import hcsmoe.result

    result = compress(tiny_models["qwen3_moe"], num_experts=4, **FAST)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hcsmoe.result, "plot_dendrograms", interrupted)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_a_previous_output_whole(tiny_models, tmp_path):
    first = compress(tiny_models["olmoe"], num_experts=4, **FAST).save(tmp_path / "out")
    (first / "stale.txt").write_text("from an earlier run")
    compress(tiny_models["olmoe"], num_experts=3, **FAST).save(tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_expert_fit_is_recorded_in_the_plan_and_redone_from_it(tiny_models, tmp_path):
    """refit steps move the gate/up weights the down-only refit (--fast) leaves alone; the plan records the
    steps, so re-applying it gives the same model."""
    fitted = compress(tiny_models["qwen3_moe"], num_experts=4, refit=RefitOptions(steps=4), **FAST)
    down_only = compress(tiny_models["qwen3_moe"], num_experts=4, fast=True, **FAST)
    assert fitted.plan.refit["steps"] == 4 and down_only.plan.refit["steps"] == 0
    fits = [layer.details["refit"]["experts"] for layer in fitted.plan.layers]
    assert all(fit["error_after"] < fit["error_before"] for fit in fits)
    gate_up = lambda result: [p for n, p in result.model.named_parameters() if n.endswith("gate_up_proj")]
    assert not any(torch.equal(a, b) for a, b in zip(gate_up(fitted), gate_up(down_only)))
    fitted.plan.save(tmp_path / "plan.json")
    reapplied = compress(tiny_models["qwen3_moe"], plan=Plan.load(tmp_path / "plan.json"), **FAST)
    assert torch.equal(logits(reapplied.model), logits(fitted.model))


def test_the_winners_expert_fit_uses_every_calibration_token_and_the_plan_redoes_it(tiny_models, tmp_path):
    """The per-layer choice fits its candidates' router and down projections on 7/8 of the tokens and scores
    them on the rest; the winner's expert fit then uses all of them. Re-applying the plan does the same, so it
    gives the same model."""
    result = compress(tiny_models["qwen3_moe"], num_experts=4, refit=RefitOptions(steps=3), **FAST)
    tokens = FAST["num_blocks"] * FAST["block_size"]
    for layer in result.plan.layers:
        assert "choice" in layer.details
        assert layer.details["refit"]["tokens"] == tokens - tokens // 8
        assert layer.details["refit"]["experts"]["tokens"] == tokens
    result.plan.save(tmp_path / "plan.json")
    reapplied = compress(tiny_models["qwen3_moe"], plan=Plan.load(tmp_path / "plan.json"), **FAST)
    assert torch.equal(logits(reapplied.model), logits(result.model))


def test_the_default_fits_the_experts_and_fast_is_the_closed_form_recipe(tiny_models):
    """The default recipe ends with the expert fit (EXPERT_FIT_STEPS whitened steps); --fast is the same recipe
    with the closed-form fits only: the refit's own defaults, weight for weight."""
    from hcsmoe.recipe import EXPERT_FIT_STEPS

    default = compress(tiny_models["qwen3_moe"], num_experts=4, **FAST)
    assert default.plan.refit["steps"] == EXPERT_FIT_STEPS and default.plan.refit["whiten"] is True
    assert all(layer.details["refit"]["experts"]["steps"] == EXPERT_FIT_STEPS for layer in default.plan.layers)
    fast = compress(tiny_models["qwen3_moe"], num_experts=4, fast=True, **FAST)
    closed_form = compress(tiny_models["qwen3_moe"], num_experts=4, refit=RefitOptions(), **FAST)
    assert fast.plan.refit == closed_form.plan.refit and fast.plan.refit["steps"] == 0
    assert all("experts" not in layer.details["refit"] for layer in fast.plan.layers)
    for name, tensor in fast.model.state_dict().items():
        assert torch.equal(tensor, closed_form.model.state_dict()[name]), name
    assert not torch.equal(logits(fast.model), logits(default.model))


def test_statistics_file_round_trips_and_replans_at_another_k(tiny_models, tmp_path):
    from hcsmoe.calibration.statistics import TENSOR_FIELDS, Statistics

    first = compress(tiny_models["qwen3_moe"], num_experts=6, method="hc-smoe", output_samples=16, **FAST)
    first.stats.save(tmp_path / "stats.safetensors")
    loaded = Statistics.load(tmp_path / "stats.safetensors")
    for a, b in zip(first.stats.layers, loaded.layers):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in TENSOR_FIELDS if getattr(a, f) is not None)
    direct = compress(tiny_models["qwen3_moe"], num_experts=3, method="hc-smoe", **FAST)
    replanned = compress(tiny_models["qwen3_moe"], num_experts=3, method="hc-smoe", stats=loaded, progress=False)
    without_recipe = lambda plan: {k: v for k, v in plan.to_dict().items() if k != "recipe"}  # calibration sizes differ
    assert without_recipe(replanned.plan) == without_recipe(direct.plan)
    assert torch.equal(logits(replanned.model), logits(direct.model))
