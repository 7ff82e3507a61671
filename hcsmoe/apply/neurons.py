"""Stage 3, merging a group neuron by neuron (fix-dom, aligned, select, select-energy) instead of
averaging whole weight matrices: each merged expert is built from the members' neurons.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from hcsmoe.calibration.statistics import LayerStats
from hcsmoe.checkpoints.architectures import Architecture, expert_intermediate
from hcsmoe.planners.plan import Group


def neurons_first(gate_up: torch.Tensor, down: torch.Tensor, architecture: Architecture):
    """One expert's weights with the intermediate neuron as the leading axis: [I, 2, H] and [I, H]."""
    if architecture.transposed:
        gate_up, down = gate_up.T, down.T
    if architecture.gate_up_interleaved:
        pairs = gate_up.reshape(-1, 2, gate_up.shape[-1])
    else:
        pairs = gate_up.reshape(2, -1, gate_up.shape[-1]).transpose(0, 1)
    return pairs, down.T


def neurons_back(pairs: torch.Tensor, down_columns: torch.Tensor, architecture: Architecture):
    """Inverse of neurons_first."""
    if architecture.gate_up_interleaved:
        gate_up = pairs.reshape(-1, pairs.shape[-1])
    else:
        gate_up = pairs.transpose(0, 1).reshape(-1, pairs.shape[-1])
    down = down_columns.T
    if architecture.transposed:
        gate_up, down = gate_up.T, down.T
    return gate_up, down


def routed_gates(stats: LayerStats, members: list[int], top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, gates [T, members]) of the calibration inputs that the original router sent to at least one
    member (all inputs if fewer than two): each member's softmax probability where it is in the top-k, else 0.
    A top-k renormalisation would scale a token's gates by one factor, which only reweighs tokens in a fit.

    The choice is the top-k of the plain logits x @ W^T: close to, not exactly, the routing of families
    with a router bias, score correction or group limit; it only selects the tokens that merges learn from.
    """
    x = stats.router_inputs
    logits = x @ stats.router_weight.to(x.device).T
    probs = torch.softmax(logits.float(), dim=-1)
    chosen = logits.topk(top_k, dim=-1).indices
    routed = torch.stack([(chosen == e).any(-1) for e in members], dim=1)
    gates = probs[:, members] * routed
    hit = routed.any(-1)
    return (x[hit], gates[hit]) if int(hit.sum()) >= 2 else (x, gates)


def standardized(a: torch.Tensor) -> torch.Tensor:
    return (a - a.mean(0)) / a.std(0).clamp(min=1e-6)


def fix_dom_expert(view: nn.Module, architecture: Architecture, group: Group, stats: LayerStats, top_k: int):
    """ZipIt-style fix-dom merge of one group into its most-used member's neuron layout (`view`: the experts
    module holding exactly the group's members, in order; see members_view).

    Every neuron of every other member is matched to the dominant neuron whose activation (act(gate) * up
    on the tokens routed to the group) it correlates with most. A dominant neuron's gate/up rows become the
    merge-weighted average of its own and its matched neurons' rows; its down column becomes the
    merge-weighted sum of them, so the group's weighted-average output is kept where matched activations agree.
    Returns float32 gate_up (with its bias column when the family has one, see gate_up_with_bias) and down.
    """
    members, weights = group.members, group.weights
    dominant = max(range(len(members)), key=lambda i: (group.frequencies[i], -members[i]))
    x = routed_gates(stats, members, top_k)[0].to(view.gate_up_proj.device)
    activations = expert_intermediate(view, architecture, x)  # [m, n, I]
    reference = standardized(activations[dominant])
    dom_pairs, dom_down = neuron_layout(view, dominant, architecture)
    pair_sum = weights[dominant] * dom_pairs
    pair_weight = torch.full((dom_pairs.shape[0],), weights[dominant], dtype=torch.float32)
    down_sum = weights[dominant] * dom_down
    for position, weight in enumerate(weights):
        if position == dominant:
            continue
        correlation = reference.T @ standardized(activations[position]) / x.shape[0]  # [I_dom, I_member]
        match = correlation.argmax(dim=0)  # dominant neuron for each member neuron
        pairs, down = neuron_layout(view, position, architecture)
        pair_sum.index_add_(0, match, weight * pairs)
        pair_weight.index_add_(0, match, torch.full((len(match),), weight))
        down_sum.index_add_(0, match, weight * down)
    gate_up, down = neurons_back(pair_sum / pair_weight.view(-1, 1, 1), down_sum, architecture)
    return gate_up, down


def gate_up_with_bias(experts: nn.Module, expert: int, architecture: Architecture) -> torch.Tensor:
    """One expert's gate_up weights in float32, its gate_up bias (GPT-OSS) appended as one more input column,
    so that aligning and averaging neurons moves each neuron's bias with its weights."""
    weight = experts.gate_up_proj[expert].float()
    bias = getattr(experts, "gate_up_proj_bias", None)
    if bias is None:
        return weight
    column = bias[expert].float()
    return torch.cat([weight, column[None, :]]) if architecture.transposed else torch.cat([weight, column[:, None]], 1)


@torch.no_grad()
def aligned_expert(view: nn.Module, architecture: Architecture, group: Group, stats: LayerStats, top_k: int):
    """REAM's merge of one group: every member's neurons are permuted one-to-one onto the anchor's (the member
    with the largest merge weight), matching neurons whose activations on the calibration inputs correlate
    and whose weights point the same way (Hungarian algorithm on the sum of both distances), then all
    weights are averaged with the merge weights. Returns float32 gate_up (with bias column) and down."""
    members, weights = group.members, group.weights
    anchor = max(range(len(members)), key=lambda i: (weights[i], -members[i]))
    x = stats.router_inputs.to(view.gate_up_proj.device)
    activations = expert_intermediate(view, architecture, x)  # [m, n, I]
    layouts = [neuron_layout(view, position, architecture) for position in range(len(members))]
    reference = standardized(activations[anchor])
    anchor_vectors = torch.nn.functional.normalize(_neuron_vectors(*layouts[anchor]), dim=1)
    pairs = torch.zeros_like(layouts[anchor][0])
    down = torch.zeros_like(layouts[anchor][1])
    for position, weight in enumerate(weights):
        member_pairs, member_down = layouts[position]
        if position != anchor:
            correlation = reference.T @ standardized(activations[position]) / x.shape[0]  # [I_anchor, I_member]
            vectors = torch.nn.functional.normalize(_neuron_vectors(member_pairs, member_down), dim=1)
            cost = (1 - correlation) + (1 - anchor_vectors @ vectors.T)
            _, order = linear_sum_assignment(cost.double().numpy())
            order = torch.as_tensor(order)
            member_pairs, member_down = member_pairs[order], member_down[order]
        pairs += weight * member_pairs
        down += weight * member_down
    return neurons_back(pairs, down, architecture)


SELECT_RIDGE = 0.01  # the selection's ridge, relative to the mean diagonal of its Gram matrix (as the refit's)


EXACT_SELECTION = 512  # candidate neurons up to which least_squares_subset removes them one at a time


SELECTION_ROUNDS = 8  # beyond it, each round removes 1/8 of the neurons still to remove


INDEPENDENT = 0.5  # |correlation| of two columns' A^-1 entries above which one round removes only one of them


def gated_intermediate(view: nn.Module, architecture: Architecture, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """[m, T, I]: what each member's down projection multiplies on tokens x routed with gates [T, m]."""
    if architecture.gate_on_input:
        return torch.stack([expert_intermediate(view, architecture, x * gates[:, p : p + 1])[p]
                            for p in range(gates.shape[1])])
    return expert_intermediate(view, architecture, x) * gates.T.unsqueeze(-1)


def members_on_routed_tokens(view: nn.Module, architecture: Architecture, group: Group, stats: LayerStats,
                             top_k: int):
    """What both neuron selections start from: the routed calibration inputs and the members' gates on them,
    each member's (gate/up pairs, down columns), and each member's activations on its own gate [m, T, I]."""
    x, gates = routed_gates(stats, group.members, top_k)
    x, gates = x.to(view.gate_up_proj.device), gates.to(view.gate_up_proj.device)
    layouts = [neuron_layout(view, position, architecture) for position in range(len(group.members))]
    return x, gates, layouts, gated_intermediate(view, architecture, x, gates)


@torch.no_grad()
def selected_expert(view: nn.Module, architecture: Architecture, group: Group, stats: LayerStats, top_k: int):
    """A merged expert made of whole neurons of its members: the I neurons (gate/up rows unchanged) that, routed
    with the group's summed gate, best reproduce the members' summed output on the calibration inputs, with
    their down columns fitted by least squares (ridge, pulled toward their own). Neurons are removed one at a
    time (in rounds for large experts, see least_squares_subset), always the one whose loss raises the fitted
    error least (the Optimal Brain Surgeon step for a least squares readout), so redundant neurons go before
    distinct ones. Candidates: at most 2I, the members' neurons with the most output energy (`select-energy`
    keeps the top I of those and nothing else).
    The refit (refit.py) later fits the readouts again, against the whole layer's output."""
    x, gates, layouts, own = members_on_routed_tokens(view, architecture, group, stats, top_k)
    width = layouts[0][0].shape[0]
    target = sum(own[p].double() @ layouts[p][1].double() for p in range(len(layouts)))
    pool = _energy_order(own, layouts)[: 2 * width].sort().values
    together = gated_intermediate(view, architecture, x, gates.sum(1, keepdim=True).expand_as(gates))
    features = together.permute(1, 0, 2).reshape(x.shape[0], -1)[:, pool].double()
    start = torch.cat([down for _, down in layouts])[pool].double()
    kept, readout = least_squares_subset(features, target, start, width)
    pairs = torch.cat([pairs for pairs, _ in layouts])[pool[kept]]
    return neurons_back(pairs, readout.float(), architecture)


def least_squares_subset(features: torch.Tensor, target: torch.Tensor, start: torch.Tensor,
                         width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept column indices, ascending; their readout rows) after removing columns of `features` [T, n] down to
    `width`, each time the one whose removal raises min ||target - F W||^2 + r ||W - start||^2 least:
    ||W_j||^2 / (A^-1)_jj for A = F^T F + r I, with A^-1 and W downdated (float64). Up to EXACT_SELECTION
    columns they go one at a time; beyond, each round removes 1/SELECTION_ROUNDS of those still to remove at
    once (a block downdate, BLAS-3: one at a time moves O(n^2 + nH) memory per column, 11 s for a Qwen3-30B
    pair on 2 cores against 1 s), skipping any whose inverse-Gram correlation with one already taken shows
    that the two stand in for each other."""
    gram = features.T @ features
    ridge = SELECT_RIDGE * float(gram.diagonal().mean()) or 1e-12
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)))
    readout = inverse @ (features.T @ target + ridge * start)
    index = torch.arange(gram.shape[0])
    while index.numel() > width:
        excess = index.numel() - width
        size = 1 if gram.shape[0] <= EXACT_SELECTION else max(1, excess // SELECTION_ROUNDS)
        batch = _cheapest_independent(readout.pow(2).sum(1) / inverse.diagonal(), inverse, size)
        keep = torch.ones(index.numel(), dtype=torch.bool)
        keep[batch] = False
        cross, block = inverse[keep][:, batch], inverse[batch][:, batch]
        readout = readout[keep] - cross @ torch.linalg.solve(block, readout[batch])
        inverse = inverse[keep][:, keep] - cross @ torch.linalg.solve(block, cross.T)
        index = index[keep]
    return index, readout


def _cheapest_independent(cost: torch.Tensor, inverse: torch.Tensor, size: int) -> torch.Tensor:
    """Up to `size` columns, cheapest first, none of them strongly correlated (through A^-1) with a cheaper one
    taken: removing both of two near-duplicates would cost far more than their separate costs say."""
    order = cost.argsort(stable=True)
    if size == 1:
        return order[:1]
    pool = order[: 4 * size]
    scale = inverse.diagonal()[pool].sqrt()
    correlation = (inverse[pool][:, pool] / scale[:, None] / scale[None, :]).abs().cpu().numpy()  # a cheap loop
    taken: list[int] = []
    for position in range(pool.numel()):
        if len(taken) == size:
            break
        if not taken or correlation[position, taken].max() <= INDEPENDENT:
            taken.append(position)
    return pool[taken]


def _energy_order(activations: torch.Tensor, layouts: list) -> torch.Tensor:
    """All the members' neurons, most output energy first (mean over tokens of (gate x activation)^2 x |down|^2)."""
    energy = torch.cat([activations[p].pow(2).mean(0) * down.pow(2).sum(1) for p, (_, down) in enumerate(layouts)])
    return energy.argsort(descending=True, stable=True)


@torch.no_grad()
def energy_selected_expert(view: nn.Module, architecture: Architecture, group: Group, stats: LayerStats, top_k: int):
    """The members' I neurons with the most output energy, unchanged (weights and down columns): the selection
    before the least-squares one, kept to compare with it."""
    _, _, layouts, own = members_on_routed_tokens(view, architecture, group, stats, top_k)
    order = _energy_order(own, layouts)[: layouts[0][0].shape[0]].sort().values
    return neurons_back(torch.cat([p for p, _ in layouts])[order], torch.cat([d for _, d in layouts])[order], architecture)


def _neuron_vectors(pairs: torch.Tensor, down_columns: torch.Tensor) -> torch.Tensor:
    """One row per intermediate neuron: its gate row, up row and down column side by side."""
    return torch.cat([pairs.reshape(pairs.shape[0], -1), down_columns], dim=1)


NEURON_MERGES = {"fix-dom": fix_dom_expert, "aligned": aligned_expert, "select": selected_expert,
                 "select-energy": energy_selected_expert}


def gate_up_tensors(gate_up: torch.Tensor, with_bias: bool, architecture: Architecture) -> dict[str, torch.Tensor]:
    """gate_up_proj (and its bias, which neuron_layout carried as one more input column) of one built expert."""
    if not with_bias:
        return {"gate_up_proj": gate_up}
    if architecture.transposed:
        return {"gate_up_proj": gate_up[:-1], "gate_up_proj_bias": gate_up[-1]}
    return {"gate_up_proj": gate_up[..., :-1], "gate_up_proj_bias": gate_up[..., -1]}


def neuron_layout(view: nn.Module, position: int, architecture: Architecture):
    """Expert `position` of `view` as [I, 2, H] gate/up pairs (bias column included) and [I, H] down columns."""
    return neurons_first(gate_up_with_bias(view, position, architecture), view.down_proj[position].float(),
                         architecture)
