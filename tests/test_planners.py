"""Every planner on hand-made statistics where the right answer is known, and on tiny real models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import pdist
from transformers import AutoModelForCausalLM

from hcsmoe.checkpoints.architectures import MoELayer, architecture_for, moe_layers
from hcsmoe.apply.layer import apply_plan_keeping_router, members_view
from hcsmoe.apply.neurons import fix_dom_expert
from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.errors import UserError
from hcsmoe.runners.layerwise import calibrate_model
from hcsmoe.checkpoints.loading import load_model, load_tokenizer
from hcsmoe.calibration.text import calibration_blocks
from hcsmoe.pipeline import compress
from hcsmoe.planners.pruning import EAN, REAP, FrequencyPrune, OPrune, SoftPrune
from hcsmoe.planners.registry import PLANNERS
from hcsmoe.planners.plan import Group
from hcsmoe.planners.clustering import HCSMoE, KMeans, MSMoE, capped_linkage

FAST = dict(num_blocks=4, block_size=64, progress=False)


def hand_made(e: int = 6, h: int = 4, n: int = 50, seed: int = 0, **fields) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    defaults = dict(
        layer=0,
        mean_output=torch.randn(e, h, generator=g),
        counts=torch.arange(e, 0, -1).float(),
        mean_router_prob=torch.full((e,), 1 / e),
        router_inputs=torch.randn(n, h, generator=g),
        router_weight=torch.randn(e, h, generator=g),
    )
    return LayerStats(**(defaults | fields))


def kept(plan) -> list[int]:
    return sorted(m for g in plan.groups for m in g.members)


def test_f_prune_keeps_the_most_frequent():
    stats = hand_made(counts=torch.tensor([5.0, 50, 1, 30, 7, 2]))
    assert kept(FrequencyPrune().plan_layer(stats, 3)) == [1, 3, 4]


def test_s_prune_keeps_the_highest_mean_probability():
    stats = hand_made(mean_router_prob=torch.tensor([0.1, 0.05, 0.4, 0.05, 0.3, 0.1]))
    assert kept(SoftPrune().plan_layer(stats, 2)) == [2, 4]


def test_reap_and_ean_keep_the_highest_scores():
    stats = hand_made(reap=torch.tensor([0.0, 3, 1, 2, 0.5, 4]), ean=torch.tensor([9.0, 1, 1, 1, 1, 8]))
    assert kept(REAP().plan_layer(stats, 3)) == [1, 3, 5]
    assert kept(EAN().plan_layer(stats, 2)) == [0, 5]


def brute_force_o_prune(stats: LayerStats, k: int, top_k: int) -> tuple[int, ...]:
    """Independent reference: a plain loop over subsets and tokens."""
    outputs, x, w = stats.sample_outputs.double(), stats.router_inputs.double(), stats.router_weight.double()
    e, n, _ = outputs.shape

    def layer_output(subset, t):
        logits = x[t] @ w[list(subset)].T
        probs = torch.softmax(logits, 0)
        top = probs.topk(top_k)
        weights = top.values / top.values.sum()
        return sum(wt * outputs[list(subset)[i], t] for wt, i in zip(weights, top.indices.tolist()))

    full = [layer_output(range(e), t) for t in range(n)]
    errors = {s: sum(float((layer_output(s, t) - full[t]).pow(2).sum()) for t in range(n))
              for s in itertools.combinations(range(e), k)}
    return min(errors, key=errors.get)


def test_o_prune_exhaustive_search_finds_the_best_subset():
    g = torch.Generator().manual_seed(1)
    e, n, h = 6, 30, 4
    outputs = torch.randn(e, n, h, generator=g)
    inputs, weight = torch.randn(n, h, generator=g), torch.randn(e, h, generator=g)
    inputs[:, 0] = 5.0
    weight[[1, 3, 4], 0] = -10.0  # planted: experts 1, 3, 4 are never in any token's top-2
    stats = hand_made(e=e, h=h, n=n, sample_outputs=outputs, router_inputs=inputs, router_weight=weight)
    plan = OPrune(top_k=2).plan_layer(stats, 3)
    assert plan.details["exhaustive"] and plan.details["subsets_tried"] == 20
    assert kept(plan) == [0, 2, 5] and plan.details["error"] < 1e-9
    stats.router_weight = torch.randn(e, h, generator=g)  # no planted answer: agree with a plain loop
    plan = OPrune(top_k=2).plan_layer(stats, 3)
    assert tuple(kept(plan)) == brute_force_o_prune(stats, 3, top_k=2)


def test_o_prune_samples_when_there_are_too_many_subsets():
    stats = hand_made(e=8, n=20, sample_outputs=torch.randn(8, 20, 4))
    plan = OPrune(max_subsets=30, top_k=2).plan_layer(stats, 4)
    assert not plan.details["exhaustive"] and plan.details["subsets_tried"] == 30 and len(plan.groups) == 4


def test_m_smoe_joins_identical_router_column_to_its_dominant():
    weight = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    weight[4] = weight[1]  # expert 4 routes exactly like expert 1
    stats = hand_made(router_weight=weight, counts=torch.tensor([1.0, 90, 80, 2, 3, 70]))
    plan = MSMoE().plan_layer(stats, 3)
    assert plan.details["dominant"] == [1, 2, 5]
    assert [1, 4] in [g.members for g in plan.groups]
    assert sorted(len(g.members) for g in plan.groups) and kept(plan) == list(range(6))


def test_kmeans_finds_separated_clusters_and_always_k_groups():
    centres = torch.tensor([[0.0, 0], [10, 0], [0, 10]])
    points = torch.cat([c + 0.01 * torch.randn(3, 2, generator=torch.Generator().manual_seed(i))
                        for i, c in enumerate(centres)])
    stats = hand_made(e=9, h=2, mean_output=points, counts=torch.ones(9))
    assert [g.members for g in KMeans().plan_layer(stats, 3).groups] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    for k in range(1, 10):
        assert len(KMeans(seed=k).plan_layer(stats, k).groups) == k


@pytest.mark.parametrize("representation", ["expert-output", "router-logits", "weights"])
def test_hc_smoe_representations_group_identical_experts(representation):
    weight = torch.randn(6, 4)
    weight[3] = weight[0]
    mean_output = torch.randn(6, 4)
    mean_output[3] = mean_output[0]
    gram = torch.randn(6, 10).double()
    gram[3] = gram[0]
    stats = hand_made(router_weight=weight, mean_output=mean_output, weight_gram=gram @ gram.T)
    plan = HCSMoE(representation=representation).plan_layer(stats, 5)
    assert [0, 3] in [g.members for g in plan.groups]


class NeverRoutesTo(torch.nn.Module):
    """The real router with one expert masked out of every token's top-k."""

    def __init__(self, router, dead: int):
        super().__init__()
        self.weight, self.top_k, self.dead = router.weight, router.top_k, dead

    def forward(self, x):
        logits = torch.nn.functional.linear(x, self.weight)
        probs = torch.softmax(logits.index_fill(1, torch.tensor([self.dead]), float("-inf")), dim=-1)
        top = probs.topk(self.top_k, dim=-1)
        return logits, top.values / top.values.sum(-1, keepdim=True), top.indices


def test_reap_scores_match_an_independent_computation_and_rank_a_dead_expert_last(tiny_models):
    model = load_model(tiny_models["qwen3_moe"])
    arch = architecture_for(model.config)
    layers = moe_layers(model, arch)
    layers[0] = MoELayer(0, layers[0].block, NeverRoutesTo(layers[0].router, 3), layers[0].experts)
    layers[0].block.gate = layers[0].router  # the model itself routes around expert 3
    blocks = calibration_blocks(load_tokenizer(tiny_models["qwen3_moe"]), "wiki:en", 2, 32, 64)
    stats = calibrate_model(model, arch, blocks, progress=False)[0]
    assert stats.counts[3] == 0 and stats.reap[3] == 0
    assert 3 not in kept(REAP().plan_layer(stats, 7))

    captured = []
    handle = layers[0].block.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model.base_model(input_ids=blocks)
    handle.remove()
    x = torch.cat(captured)
    experts = layers[0].experts
    with torch.no_grad():
        _, scores, indices = layers[0].router(x)
    totals, counts = torch.zeros(8, dtype=torch.float64), torch.zeros(8)
    with torch.no_grad():
        for t in range(x.shape[0]):
            for slot, e in enumerate(indices[t].tolist()):
                gate, up = (experts.gate_up_proj[e] @ x[t]).chunk(2)
                out = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                totals[e] += float(scores[t, slot]) * float(out.norm())
                counts[e] += 1
    assert torch.allclose(stats.reap.double(), totals / counts.clamp(min=1), rtol=1e-4, atol=1e-6)


def test_fix_dom_merge_of_identical_experts_is_that_expert(tiny_models):
    model = load_model(tiny_models["mixtral"])
    arch = architecture_for(model.config)
    moe = moe_layers(model, arch)[0]
    with torch.no_grad():
        moe.experts.gate_up_proj[2] = moe.experts.gate_up_proj[5]
        moe.experts.down_proj[2] = moe.experts.down_proj[5]
    stats = hand_made(e=8, h=32, n=64, router_weight=moe.router.weight.detach().clone())
    group = Group([2, 5], [0.3, 0.7], [0.3, 0.7])
    gate_up, down = fix_dom_expert(members_view(moe.experts, group.members), arch, group, stats, top_k=2)
    assert torch.allclose(gate_up, moe.experts.gate_up_proj[5], atol=1e-6)
    assert torch.allclose(down, moe.experts.down_proj[5], atol=1e-6)


@pytest.mark.parametrize("method", sorted(PLANNERS))
def test_every_method_saves_a_checkpoint_with_k_experts(tiny_models, tmp_path, method):
    result = compress(tiny_models["qwen3_moe"], num_experts=5, method=method, max_subsets=50, **FAST)
    out = result.save(tmp_path / method)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for moe in moe_layers(reloaded, architecture_for(reloaded.config)):
        assert moe.experts.gate_up_proj.shape[0] == 5 and moe.router.weight.shape[0] == 5
    assert reloaded.config.num_experts == 5


def test_fix_dom_and_weight_representation_through_the_pipeline(tiny_models):
    result = compress(tiny_models["olmoe"], num_experts=4, method="hc-smoe", merge="fix-dom", representation="weights",
                      **FAST)
    assert result.plan.merge == "fix-dom" and result.plan.options["representation"] == "weights"
    assert torch.isfinite(result.model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_keeping_the_full_router_aliases_group_members(tiny_models):
    result = compress(tiny_models["qwen3_moe"], num_experts=4, method="hc-smoe", **FAST)
    model = load_model(tiny_models["qwen3_moe"])
    arch = architecture_for(model.config)
    apply_plan_keeping_router(model, arch, moe_layers(model, arch), result.plan)
    moe = moe_layers(model, arch)[0]
    assert moe.router.weight.shape[0] == 8
    merged = moe_layers(result.model, arch)[0]
    for g, group in enumerate(result.plan.layers[0].groups):
        for member in group.members:
            assert torch.equal(moe.experts.gate_up_proj[member], merged.experts.gate_up_proj[g].float())


@pytest.mark.parametrize("method", ["average", "single", "complete", "ward"])
def test_capped_linkage_is_scipys_when_the_cap_never_binds(method):
    points = np.random.default_rng(1).normal(size=(24, 6))
    distances = pdist(points)
    assert np.allclose(capped_linkage(distances, 24, method, cap=24, k=6), scipy_linkage(distances, method=method))


def test_a_group_size_cap_is_respected_and_still_gives_exactly_k():
    """Points on a line with one dense clump: uncapped average linkage swallows the clump in one group."""
    points = np.concatenate([np.linspace(0, 0.1, 12), np.linspace(5, 50, 8)])[:, None]
    stats = hand_made(e=20, h=1, mean_output=torch.tensor(points, dtype=torch.float32))
    free = HCSMoE().plan_layer(stats, 8)
    capped = HCSMoE(max_group_size=3).plan_layer(stats, 8)
    assert max(len(g.members) for g in free.groups) > 3
    assert len(capped.groups) == 8 and max(len(g.members) for g in capped.groups) <= 3
    assert sorted(m for g in capped.groups for m in g.members) == list(range(20))
    with pytest.raises(UserError, match="max-group-size"):
        HCSMoE(max_group_size=2).plan_layer(stats, 8)


def test_stun_clusters_the_nearest_router_rows_and_keeps_the_expert_nearest_each_mean():
    """Nine experts whose router rows sit in three tight triples far apart: three clusters, the triples; each
    keeps the member whose weights lie nearest the cluster's mean (its middle one, by the weights' Gram)."""
    from hcsmoe.planners.stun import STUN, expert_distances

    centres = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    order = [0, 1, 2, 0, 1, 2, 0, 1, 2]  # expert e belongs to triple order[e]
    router = torch.stack([centres[c] + 0.1 * torch.randn(4, generator=torch.Generator().manual_seed(e))
                          for e, c in enumerate(order)])
    offsets = {0: -1.0, 1: 0.1, 2: 1.0}  # experts 0-2 sit left, near and right of their triple's mean weight
    weights = torch.stack([centres[c] + offsets[e // 3] * torch.ones(4) for e, c in enumerate(order)]).double()
    stats = hand_made(e=9, h=4, router_weight=router, weight_gram=weights @ weights.T)
    plan = STUN().plan_layer(stats, 3)
    assert plan.details["clusters"] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert kept(plan) == [3, 4, 5] and all(len(g.members) == 1 for g in plan.groups)
    together = expert_distances(stats, "co-selection", 2)
    assert together.shape == (9, 9) and (together == together.T).all() and (together.diagonal() == 0).all()


def test_stun_compresses_in_memory_and_streaming_alike(tiny_models, tmp_path):
    from tests.test_streaming import assert_same_checkpoint

    memory = compress(tiny_models["qwen3_moe"], num_experts=4, method="stun", **FAST)
    assert len(memory.plan.layers[0].groups) == 4 and memory.plan.options == {"similarity": "router"}
    memory.save(tmp_path / "memory")
    compress(tiny_models["qwen3_moe"], num_experts=4, method="stun", stream_to=tmp_path / "streamed", **FAST)
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    chosen = compress(tiny_models["qwen3_moe"], num_experts=4, method="stun", similarity="co-selection", **FAST)
    assert chosen.plan.options == {"similarity": "co-selection"}


def test_owl_gives_layers_with_more_outliers_less_sparsity_around_the_target():
    from hcsmoe.apply.sparsify import OUTLIER_SPREAD, layer_sparsities

    shares = layer_sparsities([1.0, 2.0, 3.0], 0.4)
    assert shares == sorted(shares, reverse=True) and abs(sum(shares) / 3 - 0.4) < 1e-9
    assert abs(shares[0] - shares[2] - 2 * OUTLIER_SPREAD) < 1e-9


def test_owl_wanda_zeroes_each_layers_share_of_every_output_row(tiny_models, capsys, tmp_path):
    """--sparsity 0.25: every routed-expert weight row loses its layer's share (OWL's, around 0.25) of its
    lowest-scoring weights; the plan records the shares; a streaming run refuses it in one line."""
    from tests.test_cli import assert_one_line_error, run_cli

    result = compress(tiny_models["qwen3_moe"], num_experts=4, fast=True, sparsity=0.25, **FAST)
    report = result.plan.sparsity
    assert abs(sum(report["layer_sparsities"]) / len(report["layer_sparsities"]) - 0.25) < 1e-9
    layers = moe_layers(result.model, architecture_for(result.model.config))
    for moe, share in zip(layers, report["layer_sparsities"]):
        for name in ("gate_up_proj", "down_proj"):
            rows = getattr(moe.experts, name).detach()
            zeros = (rows == 0).sum(-1).float()  # per output row ([E, out, in] storage)
            assert (zeros == int(rows.shape[-1] * share)).all(), (name, share)
    code, _, err = run_cli(capsys, "compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--sparsity", "0.25",
                           "--stream", "--no-eval", "-q", "--out", str(tmp_path / "o"))
    assert_one_line_error(code, err)
    assert "runs in memory" in err
