"""The fitting stages (refit.py, router_fit.py) and the neuron-level merges, on cases whose answer is known."""

from __future__ import annotations

import copy

import pytest
import torch

from hcsmoe.checkpoints.architectures import architecture_for, moe_layers
from hcsmoe.apply.neurons import EXACT_SELECTION, SELECT_RIDGE, aligned_expert, energy_selected_expert, least_squares_subset, selected_expert
from hcsmoe.apply.layer import members_view
from hcsmoe.calibration.statistics import BlockTokens, expert_features, route_tokens
from hcsmoe.errors import UserError
from hcsmoe.fitting.expert_fit import (FIT_MEMORY, HISTORY, OVERHEAD_COPIES, SHORT_HISTORY, WHITENING_RIDGE,
                               coupled_groups, current_output,
                               evenly_spaced, expert_weights, expert_whitenings, fit_experts, fit_schedule, one_expert,
                               per_expert_tokens, whitening)
from hcsmoe.checkpoints.loading import load_model
from hcsmoe.planners.ream import REAM, greedy_groups, nearest_groups
from hcsmoe.planners.plan import Group, LayerPlan
from hcsmoe.fitting.refit import RefitOptions, down_matrices, keeps_factors, refit_layer
from hcsmoe.fitting.router_fit import (RouterFitOptions, fit_rows, mass_owners, routing_targets, score_targets,
                                      sigmoid_divergence)

from tests.test_planners import hand_made

FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "llama4_text")


def tokens_of(moe, architecture, n: int = 600, seed: int = 0) -> BlockTokens:
    """Random block inputs, with the layer's own routed output as the target."""
    x = torch.randn(n, moe.router.weight.shape[1], generator=torch.Generator().manual_seed(seed))
    scores, weights, indices = route_tokens(moe, architecture, x)
    return BlockTokens(x, layer_output(moe, architecture, x, weights, indices), scores)


def layer_output(moe, architecture, x, weights, indices) -> torch.Tensor:
    """The routed output as sum over slots of the expert's features times its readout (float64)."""
    matrices = down_matrices(moe.experts, architecture)
    out = torch.zeros(x.shape[0], matrices.shape[-1], dtype=torch.float64)
    for expert in range(matrices.shape[0]):
        token, slot = (indices == expert).nonzero(as_tuple=True)
        if token.numel():
            phi = expert_features(moe.experts, architecture, expert, x[token], weights[token, slot]).double()
            out.index_add_(0, token, phi @ matrices[expert])
    return out.float()


def first_moe(tiny_models, family: str):
    model = load_model(tiny_models[family])
    architecture = architecture_for(model.config)
    return model, architecture, moe_layers(model, architecture)[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_output_helper_matches_the_model(tiny_models, family):
    """The features x readout decomposition the refit solves for is the block's real routed output."""
    model, architecture, moe = first_moe(tiny_models, family)
    x = torch.randn(40, model.config.hidden_size)
    _, weights, indices = route_tokens(moe, architecture, x)
    direct = moe.experts(x, indices, weights) if architecture.routing != "llama4" else None
    ours = layer_output(moe, architecture, x, weights, indices)
    if direct is not None:
        assert torch.allclose(ours, direct.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("solver", ["joint", "blockwise"])
def test_refit_of_an_uncompressed_layer_keeps_it(tiny_models, family, solver):
    """K = E: the original readouts already reproduce the target, so the fit returns them."""
    _, architecture, moe = first_moe(tiny_models, family)
    block = tokens_of(moe, architecture)
    before = down_matrices(moe.experts, architecture).clone()
    report = refit_layer(moe, architecture, block, RefitOptions(alpha=1e-3, solver=solver, sweeps=30))
    assert report["error_before"] < 1e-8 and report["error_after"] < 1e-8
    assert torch.allclose(down_matrices(moe.experts, architecture), before, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_refit_recovers_readouts_that_produced_the_target(tiny_models, family):
    """Targets made by known readouts D* under the layer's routing: least squares finds D* from any start."""
    _, architecture, moe = first_moe(tiny_models, family)
    truth = down_matrices(moe.experts, architecture).clone()
    block = tokens_of(moe, architecture, n=2000)
    with torch.no_grad():
        moe.experts.down_proj.normal_(0, 0.05)
        if getattr(moe.experts, "down_proj_bias", None) is not None:
            moe.experts.down_proj_bias.zero_()
    report = refit_layer(moe, architecture, block, RefitOptions(alpha=0.0))
    assert report["error_before"] > 0.1 and report["error_after"] < 1e-8
    assert torch.allclose(down_matrices(moe.experts, architecture), truth, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_blockwise_refit_writes_the_same_bits_with_or_without_its_factors_kept(tiny_models, family):
    """A small --refit-memory makes the blockwise refit factor its systems again every sweep instead of keeping
    the factors: the same factors, so the same weights and report."""
    _, architecture, moe = first_moe(tiny_models, family)
    block = tokens_of(moe, architecture, n=500)
    with torch.no_grad():
        moe.experts.down_proj.normal_(0, 0.05)
    results = []
    for memory in (8.0, 1e-9):
        fitted = copy.deepcopy(moe)
        report = refit_layer(fitted, architecture, block, RefitOptions(solver="blockwise", sweeps=3, memory=memory),
                             torch.bfloat16)
        results.append((fitted.experts.down_proj, report))
    assert keeps_factors(8, 64, 8.0) and not keeps_factors(8, 64, 1e-9)
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_joint_and_blockwise_solvers_agree(tiny_models):
    """Gauss-Seidel over experts converges to the joint ridge solution."""
    _, architecture, moe = first_moe(tiny_models, "qwen3_moe")
    block = tokens_of(moe, architecture)
    block = BlockTokens(block.inputs, block.routed + 0.3 * torch.randn_like(block.routed), block.scores)
    fits = {}
    for solver in ("joint", "blockwise"):
        copy_ = copy.deepcopy(moe)
        report = refit_layer(copy_, architecture, block, RefitOptions(alpha=0.05, solver=solver, sweeps=60))
        fits[solver] = (down_matrices(copy_.experts, architecture), report["error_after"])
    assert torch.allclose(fits["joint"][0], fits["blockwise"][0], atol=1e-4, rtol=1e-3)
    assert fits["joint"][1] == pytest.approx(fits["blockwise"][1], rel=1e-4)


def test_ridge_pulls_toward_the_starting_readouts(tiny_models):
    """The larger alpha, the closer the fit stays to the plan's own down projections (1/alpha for large alpha)."""
    _, architecture, moe = first_moe(tiny_models, "qwen3_moe")
    block = tokens_of(moe, architecture)
    noisy = BlockTokens(block.inputs, torch.randn_like(block.routed), block.scores)
    before = down_matrices(moe.experts, architecture).detach().clone()
    moved = {}
    for alpha in (1e-2, 1e3, 1e6):
        fitted = copy.deepcopy(moe)
        refit_layer(fitted, architecture, noisy, RefitOptions(alpha=alpha))
        moved[alpha] = float((down_matrices(fitted.experts, architecture).detach() - before).norm())
    assert moved[1e6] < moved[1e3] / 500 < moved[1e-2] / 500


def test_refit_options_are_checked():
    with pytest.raises(UserError, match="solver"):
        RefitOptions(solver="magic")
    with pytest.raises(UserError, match="alpha"):
        RefitOptions(alpha=-1)
    with pytest.raises(UserError, match="steps"):
        RefitOptions(steps=-1)
    with pytest.raises(UserError, match="anchor"):
        RefitOptions(steps=30, anchor=1.0, whiten=False)
    for memory in (0, -1, float("nan")):
        with pytest.raises(UserError, match="refit-memory"):
            RefitOptions(memory=memory)


def test_the_anchor_keeps_the_expert_fit_nearer_the_plans_weights(tiny_models):
    """--refit-anchor: a stronger ridge toward the start moves the weights less and leaves more of the error,
    monotonically; anchor 0 is the plain whitened fit."""
    _, architecture, moe = first_moe(tiny_models, "qwen3_moe")
    block = tokens_of(moe, architecture, n=2000)
    perturb_gate_up(moe)
    refit_layer(moe, architecture, block, RefitOptions(alpha=0.0))
    moved, errors = [], []
    for anchor in (0.0, 1.0, 100.0):
        fitted = copy.deepcopy(moe)
        errors.append(fit_experts(fitted, architecture, block, steps=20, sample=0, anchor=anchor)["error_after"])
        moved.append(float((fitted.experts.gate_up_proj - moe.experts.gate_up_proj).detach().norm()))
    assert moved[0] > moved[1] > moved[2] > 0
    assert errors[0] < errors[1] < errors[2]


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_fit_computes_the_layer_output(tiny_models, family):
    """The differentiable expert-by-expert form the expert fit minimises is the block's real routed output
    (gate on the input for Llama 4, biases for GPT-OSS), for every family."""
    _, architecture, moe = first_moe(tiny_models, family)
    block = tokens_of(moe, architecture, n=300)
    routing = per_expert_tokens(moe, architecture, block.inputs)
    ours = current_output(moe.experts, architecture, block.inputs.float(), [(0, len(block.inputs), routing)],
                          range(len(routing)))
    assert torch.allclose(ours, block.routed, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_expert_fit_recovers_what_the_gate_up_weights_lost(tiny_models, family, whiten):
    """Targets made by the layer's own experts; gate/up weights then perturbed. The down-only refit cannot
    undo that, the expert fit (gate/up and down together, whitened or plain steps) brings most of the error
    back, never adds any, and leaves a layer that already reproduces its target as it was."""
    _, architecture, moe = first_moe(tiny_models, family)
    block = tokens_of(moe, architecture, n=2000)
    exact = copy.deepcopy(moe)
    report = fit_experts(exact, architecture, block, steps=5, sample=0, whiten=whiten)
    assert report["error_before"] < 1e-10
    assert torch.equal(exact.experts.gate_up_proj, moe.experts.gate_up_proj)
    perturb_gate_up(moe)
    floor = refit_layer(moe, architecture, block, RefitOptions(alpha=0.0))["error_after"]
    report = fit_experts(moe, architecture, block, steps=60, sample=0, whiten=whiten)
    assert report["error_before"] == pytest.approx(floor, rel=1e-3)
    assert report["error_before"] > 1e-5 and report["error_after"] < report["error_before"] / 10


def perturb_gate_up(moe) -> None:
    weight = moe.experts.gate_up_proj
    with torch.no_grad():
        weight.add_(0.3 * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("family", FAMILIES)
def test_whitened_steps_do_not_depend_on_the_scale_of_the_hidden_states(tiny_models, family):
    """Hidden states 10 times larger, gate/up weights (and the gate, for Llama 4) 10 times smaller: the same
    layer. Whitened steps fit it the same; plain steps, whose size depends on the weights' scale, do not
    (the scale of a model's hidden states and weights is its own, not a property the fit should see)."""
    _, architecture, moe = first_moe(tiny_models, family)
    block = tokens_of(moe, architecture, n=2000)
    perturb_gate_up(moe)
    scaled = copy.deepcopy(moe)
    with torch.no_grad():
        scaled.experts.gate_up_proj.div_(10)
        scaled.router.weight.div_(10)
    scaled_block = BlockTokens(block.inputs * 10, block.routed, block.scores)
    errors = {}
    for whiten in (True, False):
        ours = fit_experts(copy.deepcopy(moe), architecture, block, steps=10, sample=0, whiten=whiten)
        theirs = fit_experts(copy.deepcopy(scaled), architecture, scaled_block, steps=10, sample=0, whiten=whiten)
        assert ours["error_before"] == pytest.approx(theirs["error_before"], rel=1e-4)
        errors[whiten] = ours["error_after"], theirs["error_after"]
    assert errors[True][0] == pytest.approx(errors[True][1], rel=1e-3)
    assert abs(errors[False][0] - errors[False][1]) > 0.05 * errors[False][0]


@pytest.mark.parametrize("family", FAMILIES)
def test_whitening_changes_coordinates_not_weights(tiny_models, family):
    """At the start of the fit (zero change) the whitened leaves stand for exactly the layer's weights, and
    each whitening P makes its inputs' covariance, ridge added, the identity: P (C + r I) P^T = I."""
    _, architecture, moe = first_moe(tiny_models, family)
    x = tokens_of(moe, architecture, n=500).inputs.float()
    chunks = [(0, len(x), per_expert_tokens(moe, architecture, x))]
    for expert, whitened in enumerate(expert_whitenings(moe.experts, architecture, x, chunks)):
        fitted = list(whitened)
        leaves = one_expert(moe.experts, expert, fitted, whitened)
        weights = expert_weights(moe.experts, expert, leaves, whitened, architecture.transposed)
        for name in fitted:
            assert torch.equal(weights[name], getattr(moe.experts, name)[expert : expert + 1].float())
    gram = torch.randn(200, 6, generator=torch.Generator().manual_seed(1)) * torch.tensor([10.0, 1, 1, 0.1, 0.01, 0])
    gram = gram.T @ gram
    p = whitening(gram, 200).double()
    covariance = gram.double() / 200
    ridge = WHITENING_RIDGE * torch.linalg.eigvalsh(covariance).clamp(min=0).mean()
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(p @ (covariance + ridge * eye) @ p.T, eye, atol=1e-5)
    assert torch.equal(whitening(torch.zeros(4, 4), 0), torch.eye(4))  # an expert without tokens: nothing to rescale


def test_expert_fit_in_chunks_fits_the_same_error(tiny_models, monkeypatch):
    """Gradients accumulated over token chunks (bounded memory) give the fit over all tokens at once."""
    _, architecture, moe = first_moe(tiny_models, "qwen3_moe")
    block = tokens_of(moe, architecture, n=2000)
    perturb_gate_up(moe)
    whole = fit_experts(copy.deepcopy(moe), architecture, block, steps=10, sample=0)
    monkeypatch.setattr("hcsmoe.fitting.expert_fit.CHUNK_TOKENS", 300)
    chunked = fit_experts(moe, architecture, block, steps=10, sample=0)
    assert chunked["error_before"] == pytest.approx(whole["error_before"], rel=1e-5)
    assert chunked["error_after"] == pytest.approx(whole["error_after"], rel=0.05)


def test_large_layers_are_fitted_in_groups_with_a_shorter_history():
    """A small layer is fitted whole with HISTORY pairs; Qwen3-30B's at 64 experts (64 GB whole) in 4 groups of
    16 consecutive experts with SHORT_HISTORY pairs, each group's working set under FIT_MEMORY; in groups of one
    expert under half a GiB (--refit-memory 0.5); an expert too large for the budget alone still gets a group
    of its own."""
    assert fit_schedule(24, 3 * 64 * 256) == ([range(24)], HISTORY)
    per_expert = 3 * 768 * 2048
    groups, history = fit_schedule(64, per_expert)
    assert history == SHORT_HISTORY and [(g.start, g.stop) for g in groups] == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert 4 * per_expert * 16 * (2 * SHORT_HISTORY + OVERHEAD_COPIES) <= FIT_MEMORY
    assert fit_schedule(64, per_expert, 2**29) == ([range(e, e + 1) for e in range(64)], SHORT_HISTORY)
    assert fit_schedule(3, 10**12)[0] == [range(0, 1), range(1, 2), range(2, 3)]


def test_groups_keep_together_the_experts_that_share_tokens():
    """Tokens routed to experts 0 and 2, or to 1 and 3 (never across): two groups of two are {0, 2} and {1, 3},
    whatever their indices; groups of one keep every expert once."""
    def routing(pairs: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.tensor([t for t, pair in enumerate(pairs) if e in pair]),
                 torch.full((sum(e in pair for pair in pairs),), 0.5)) for e in range(4)]

    chunks = [(0, 6, routing([(0, 2), (1, 3), (0, 2), (1, 3), (0, 2), (1, 3)]))]
    assert coupled_groups(chunks, 4, [2, 2]) == [[0, 2], [1, 3]]
    assert sorted(e for group in coupled_groups(chunks, 4, [1, 1, 1, 1]) for e in group) == [0, 1, 2, 3]


def test_expert_fit_in_groups_starts_from_the_layer_error_and_recovers_it(tiny_models):
    """Fitted a group at a time (the others' output taken off the target), the fit starts from the same layer
    error as the whole-layer fit and still brings most of it back."""
    _, architecture, moe = first_moe(tiny_models, "qwen3_moe")
    block = tokens_of(moe, architecture, n=2000)
    perturb_gate_up(moe)
    whole = fit_experts(copy.deepcopy(moe), architecture, block, steps=30, sample=0)
    grouped = fit_experts(moe, architecture, block, steps=30, sample=0, memory=1)  # every expert a group of its own
    assert whole["groups"] == 1 and grouped["groups"] == moe.experts.down_proj.shape[0] > 1
    assert grouped["history"] == SHORT_HISTORY
    assert grouped["error_before"] == pytest.approx(whole["error_before"], rel=1e-5)
    assert whole["error_after"] < grouped["error_after"] < grouped["error_before"] / 5


def test_expert_fit_tokens_are_spread_over_the_calibration():
    assert evenly_spaced(10, 0).tolist() == list(range(10))
    assert evenly_spaced(10, 20).tolist() == list(range(10))
    assert evenly_spaced(101, 5).tolist() == [0, 25, 50, 75, 100]


def test_router_fit_recovers_a_known_router():
    """Soft labels made by a known router: the fit reproduces its probabilities (rows are only defined up
    to a common shift, so probabilities are compared)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g)
    truth = torch.randn(5, 8, generator=g)
    q = torch.softmax(x.double() @ truth.double().T, dim=1)
    fitted, _ = fit_rows(x, q, torch.zeros(5, 8), None, RouterFitOptions(beta=0.0, iterations=200))
    assert torch.allclose(torch.softmax(x @ fitted.T, 1), torch.softmax(x @ truth.T, 1), atol=1e-3)


def test_sigmoid_router_fit_recovers_a_known_router():
    """Soft labels made by a known sigmoid router: each row is its own logistic regression, so the fitted
    rows are the true ones (no common shift to hide behind)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g)
    truth = torch.randn(5, 8, generator=g)
    t = torch.sigmoid(x.double() @ truth.double().T)
    fitted, _ = fit_rows(x, t, torch.zeros(5, 8), None, RouterFitOptions(beta=0.0, iterations=200), sigmoid_divergence)
    assert torch.allclose(fitted, truth, atol=1e-3)


def test_score_targets_score_a_group_as_if_any_of_its_experts_had():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    owner = torch.tensor([1, 0, 1, -1])  # expert 3 dropped, not absorbed
    t = score_targets(scores, owner, 2)
    assert torch.allclose(t, torch.tensor([[0.2, 1 - 0.9 * 0.7]], dtype=torch.float64))


def test_sigmoid_router_fit_on_deepseek_v3_moves_rows_and_bias_toward_the_merged_routing(tiny_models):
    """A merge plan on a DeepSeek-V3 layer: the fit lowers the rows' divergence from the groups' target scores,
    and the correction bias brings each merged expert's choice rate closer to its members' summed rate, with
    the router's own group-limited choice."""
    from hcsmoe.apply.layer import apply_layer
    from hcsmoe.fitting.router_fit import fit_router
    from hcsmoe.planners.plan import Plan

    _, architecture, moe = first_moe(tiny_models, "deepseek_v3")
    block = tokens_of(moe, architecture, n=2000)
    counts = torch.bincount(route_tokens(moe, architecture, block.inputs)[2].reshape(-1), minlength=8).float()
    stats = hand_made(e=8, h=moe.router.weight.shape[1], n=64, router_weight=moe.router.weight.detach().clone())
    stats.counts = counts
    plan = LayerPlan(0, 8, [Group([0, 1], [0.5, 0.5], [0.5, 0.5]), Group([2, 3], [0.5, 0.5], [0.5, 0.5]),
                            Group([4, 5], [0.5, 0.5], [0.5, 0.5]), Group([6, 7], [0.5, 0.5], [0.5, 0.5])])
    apply_layer(moe, architecture, plan, Plan("manual", {}, "average", [plan]), stats, top_k=2)
    bias = moe.router.e_score_correction_bias.detach().clone()
    report = fit_router(moe, architecture, plan, stats, block, RouterFitOptions())
    assert report["kl_after"] < report["kl_before"]
    assert report["choice_error_after"] < report["choice_error_before"]
    assert not torch.equal(moe.router.e_score_correction_bias, bias)


def test_plans_written_before_the_sigmoid_fit_re_apply_without_it():
    old = {"beta": 0.001, "iterations": 50, "absorb": False, "only_if_softmax": True, "max_tokens": 16384}
    assert RouterFitOptions.from_dict(old).sigmoid is False
    assert RouterFitOptions.from_dict(RouterFitOptions().to_dict()) == RouterFitOptions()


def test_routing_targets_sum_each_groups_mass():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    owner = torch.tensor([1, 0, 1, -1])  # expert 3 dropped, not absorbed: its mass is renormalised away
    q = routing_targets(scores, owner, 2)
    assert torch.allclose(q, torch.tensor([[0.2 / 0.6, 0.4 / 0.6]], dtype=torch.float64))


def test_dropped_experts_are_absorbed_by_the_most_similar_kept_expert():
    stats = hand_made(e=4, h=2, mean_output=torch.tensor([[1.0, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]]))
    plan = LayerPlan(0, 4, [Group([0], [1.0], [0.5]), Group([1], [1.0], [0.5])])
    assert mass_owners(plan, stats, absorb=True).tolist() == [0, 1, 0, 1]
    assert mass_owners(plan, stats, absorb=False).tolist() == [0, 1, -1, -1]


def expert_output(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A Qwen3-MoE expert's output (SiLU-gated) on x, from its [2I, H] gate_up and [H, I] down."""
    gate, up = (x @ gate_up.T).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.T


@pytest.mark.parametrize("family", ["qwen3_moe", "llama4_text"])
def test_selected_expert_keeps_one_copy_of_each_duplicated_neuron(tiny_models, family):
    """Two members with the same weights: the merged expert is that expert again (in some neuron order), since
    dropping one copy of a neuron costs nothing and dropping a distinct one does; the energy rule, which ranks
    neurons one by one, keeps both copies of the strongest neurons and loses others (gates differ per member)."""
    _, architecture, moe = first_moe(tiny_models, family)
    with torch.no_grad():
        moe.experts.gate_up_proj[6] = moe.experts.gate_up_proj[1]
        moe.experts.down_proj[6] = moe.experts.down_proj[1]
    h = moe.router.weight.shape[1]
    stats = hand_made(e=8, h=h, n=512, router_weight=moe.router.weight.detach().clone())
    group = Group([1, 6], [0.5, 0.5], [0.5, 0.5])
    view = members_view(moe.experts, group.members)
    selected = selected_expert(view, architecture, group, stats, top_k=2)
    energy = energy_selected_expert(view, architecture, group, stats, top_k=2)
    original = (view.gate_up_proj[0], view.down_proj[0])
    if architecture.transposed:
        selected, energy, original = [tuple(t.T for t in pair) for pair in (selected, energy, original)]
    rows = lambda gate_up: torch.cat(gate_up.chunk(2), dim=1)  # one row per neuron: its gate and up weights
    assert sorted(map(tuple, rows(selected[0]).tolist())) == sorted(map(tuple, rows(original[0]).tolist()))
    assert sorted(map(tuple, rows(energy[0]).tolist())) != sorted(map(tuple, rows(original[0]).tolist()))
    if family == "qwen3_moe":
        x = torch.randn(64, h, generator=torch.Generator().manual_seed(3))
        assert torch.allclose(expert_output(*selected, x), expert_output(*original, x), atol=1e-4)


def test_least_squares_subset_beats_keeping_the_largest_columns():
    """Six columns and a near copy of each: the full least-squares weights of a pair are large and opposite, so
    keeping the six largest keeps both columns of some pairs and loses other directions, while the greedy
    removal keeps one column of each pair (an error many times smaller on any machine's rounding). Its
    readout is the ridge fit of the columns it kept."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 6, generator=g, dtype=torch.float64)
    features = torch.cat([base, base + 1e-3 * torch.randn(400, 6, generator=g, dtype=torch.float64)], dim=1)
    target = (base @ torch.randn(6, 3, generator=g, dtype=torch.float64)
              + 0.01 * torch.randn(400, 3, generator=g, dtype=torch.float64))
    fitted_error = lambda columns: float((target - features[:, columns] @ torch.linalg.lstsq(
        features[:, columns], target).solution).pow(2).sum())
    kept, readout = least_squares_subset(features, target, torch.zeros(12, 3, dtype=torch.float64), 6)
    largest = torch.linalg.lstsq(features, target).solution.pow(2).sum(1).argsort(descending=True)[:6]
    assert kept.shape == (6,) and readout.shape == (6, 3)
    assert sorted(kept.remainder(6).tolist()) == list(range(6))
    assert fitted_error(kept) < fitted_error(largest) / 100
    ridge = SELECT_RIDGE * float((features.T @ features).diagonal().mean())  # the ridge of the full problem
    chosen = features[:, kept]
    expected = torch.linalg.solve(chosen.T @ chosen + ridge * torch.eye(6, dtype=torch.float64), chosen.T @ target)
    assert torch.allclose(readout, expected, atol=1e-8)


def test_least_squares_subset_in_rounds_keeps_one_copy_of_each_duplicate():
    """Beyond EXACT_SELECTION candidates columns go in rounds; a round never takes both copies of a duplicated
    column (each alone costs nothing), so 300 columns each given twice come back as one copy of each, with the
    target fitted as well as by all of them."""
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(2000, 300, generator=g, dtype=torch.float64)
    features = torch.cat([distinct, distinct], dim=1)
    assert features.shape[1] > EXACT_SELECTION
    target = distinct @ torch.randn(300, 4, generator=g, dtype=torch.float64)
    kept, readout = least_squares_subset(features, target, torch.zeros(600, 4, dtype=torch.float64), 300)
    assert sorted((kept % 300).tolist()) == list(range(300))
    residual = (target - features[:, kept] @ readout).pow(2).sum() / target.pow(2).sum()
    assert float(residual) < 1e-3


def test_aligned_merge_undoes_a_neuron_permutation(tiny_models):
    """A member that is the anchor with its neurons permuted merges back into the anchor exactly."""
    _, architecture, moe = first_moe(tiny_models, "qwen3_moe")
    width = moe.experts.down_proj.shape[-1]
    order = torch.randperm(width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gate, up = moe.experts.gate_up_proj[2].chunk(2)
        moe.experts.gate_up_proj[6] = torch.cat([gate[order], up[order]])
        moe.experts.down_proj[6] = moe.experts.down_proj[2][:, order]
    stats = hand_made(e=8, h=32, n=256, router_weight=moe.router.weight.detach().clone())
    group = Group([2, 6], [0.6, 0.4], [0.5, 0.5])
    gate_up, down = aligned_expert(members_view(moe.experts, group.members), architecture, group, stats, top_k=2)
    assert torch.allclose(gate_up, moe.experts.gate_up_proj[2], atol=1e-6)
    assert torch.allclose(down, moe.experts.down_proj[2], atol=1e-6)


def test_ream_groups_around_the_most_salient_experts():
    similarity = torch.tensor([[1.0, 0.9, 0.1, 0.8],
                               [0.9, 1.0, 0.2, 0.7],
                               [0.1, 0.2, 1.0, 0.3],
                               [0.8, 0.7, 0.3, 1.0]])
    # greedy (REAM as published): centre 0 takes its two most similar free experts before centre 2 chooses
    assert greedy_groups(similarity, [0, 2], cap=3) == {0: [0, 1, 3], 2: [2]}
    # nearest with room: the most similar pairs first, at most 2 per group
    assert nearest_groups(similarity, [0, 2], cap=2) == {0: [0, 1], 2: [2, 3]}
    stats = hand_made(e=4, h=2, reap=torch.tensor([3.0, 1.0, 2.0, 0.5]), gated_mean_output=torch.randn(4, 2))
    plan = REAM(group_size=2, assignment="nearest").plan_layer(stats, 2)
    assert sorted(plan.details["centres"]) == [0, 2]
    assert sorted(m for g in plan.groups for m in g.members) == [0, 1, 2, 3]
    for group in plan.groups:  # saliency weights, summing to one
        expected = stats.reap[group.members] / stats.reap[group.members].sum()
        assert torch.allclose(torch.tensor(group.weights, dtype=torch.float64), expected.double(), atol=1e-6)


def test_ream_refuses_groups_too_small_to_hold_every_expert():
    stats = hand_made(e=6, h=2, reap=torch.arange(6.0), gated_mean_output=torch.randn(6, 2))
    with pytest.raises(UserError, match="group-size"):
        REAM(group_size=2, assignment="nearest").plan_layer(stats, 2)


def test_per_layer_choice_keeps_the_plan_with_the_smaller_held_out_error(tiny_models):
    from hcsmoe.pipeline import compress

    result = compress(tiny_models["qwen3_moe"], num_experts=4, num_blocks=4, block_size=64, progress=False)
    assert result.plan.method == "per-layer-choice"
    for layer in result.plan.layers:
        choice = layer.details["choice"]
        errors = choice["held_out_error"]
        assert set(errors) == {"ream", "reap"} and choice["chosen"] == min(errors, key=errors.get)
        merged = any(len(g.members) > 1 for g in layer.groups)
        assert merged == (choice["chosen"] == "ream")  # reap prunes; the anchored pairs merge


def test_choosing_after_the_expert_fit_scores_fitted_candidates_and_streams_to_the_same_bits(capsys, tiny_models, tmp_path):
    """--choose-fitted: every candidate gets the expert fit before it is scored; the winner is kept as fitted
    (in memory) or rebuilt and refitted on the same tokens (streaming), which gives the same weights."""
    import json

    from tests.test_cli import run_cli
    from tests.test_resume import digests

    model = str(tiny_models["deepseek_v3"])
    common = ("compress", model, "-k", "4", "--no-eval", "-q", "--blocks", "4", "--block-size", "32", "--refit-steps", "5")
    written, plans = {}, {}
    for name, extra in (("closed", ("--no-stream",)), ("fitted", ("--no-stream", "--choose-fitted")),
                        ("streamed", ("--stream", "--choose-fitted"))):
        code, _, err = run_cli(capsys, *common, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        written[name] = {k: v for k, v in digests(tmp_path / name).items() if k.endswith(".safetensors")}
        plans[name] = json.loads((tmp_path / name / "hcsmoe_plan.json").read_text())
    assert written["fitted"] == written["streamed"]
    assert plans["fitted"]["refit"]["choose_fitted"] and not plans["closed"]["refit"]["choose_fitted"]
    for before, after in zip(plans["closed"]["layers"], plans["fitted"]["layers"]):
        errors = after["details"]["choice"]["held_out_error"]
        assert after["details"]["choice"]["chosen"] == min(errors, key=errors.get)
        assert errors != before["details"]["choice"]["held_out_error"]  # scored after the expert fit
        assert "experts" in after["details"]["refit"]


def test_the_expert_fit_in_groups_writes_the_same_bits_streaming_in_memory_and_at_any_thread_count(capsys, tiny_models,
                                                                                                 tmp_path):
    """--refit-memory small enough that each kept expert is a group of its own: the same weights in memory on one
    thread and streamed on two, recorded in the plan, and not the whole-layer fit's."""
    import json

    from tests.test_cli import run_cli
    from tests.test_resume import digests

    common = ("compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--no-eval", "-q", "--blocks", "4",
              "--block-size", "32", "--refit-steps", "5")
    written, plans = {}, {}
    for name, extra in (("whole", ("--no-stream",)), ("memory", ("--no-stream", "--threads", "1", "--refit-memory", "1e-9")),
                        ("streamed", ("--stream", "--threads", "2", "--refit-memory", "1e-9"))):
        code, _, err = run_cli(capsys, *common, *extra, "--out", str(tmp_path / name))
        assert code == 0, err
        written[name] = {k: v for k, v in digests(tmp_path / name).items() if k.endswith(".safetensors")}
        plans[name] = json.loads((tmp_path / name / "hcsmoe_plan.json").read_text())
    assert written["memory"] == written["streamed"] != written["whole"]
    assert plans["streamed"]["refit"]["memory"] == 1e-9
    assert all(layer["details"]["refit"]["experts"]["groups"] == 4 for layer in plans["streamed"]["layers"])
