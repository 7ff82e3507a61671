"""Step 3: weight surgery. Each group of a plan becomes one expert and one router row.

Every per-expert parameter of the fused experts module (gate_up_proj, down_proj, GPT-OSS's biases) is
merged with the group's weights, in float32, and cast back. Every per-expert entry of the router (weight
rows, GPT-OSS's bias, DeepSeek-V3's e_score_correction_bias) gets exactly one entry per group:
  - "dominant": the entries of the group's most-used member;
  - "average":  the merge-weighted average of the members' entries;
  - "lsq":      weight rows fitted by least squares, on calibration inputs, to the log-sum-exp of the
                members' logits, so that each new expert keeps the routing mass its members had; the
                bias and score correction are averaged as with "average" (the fit ignores them).
A group of one keeps its member's entries exactly, so a plan with K = E reproduces the model bit for bit.
Shared experts, their gates and dense layers are not touched.
"""

from __future__ import annotations

import copy

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from tqdm.auto import tqdm

from hcsmoe.adapters import Architecture, MoELayer, expert_intermediate, expert_parameters, set_expert_count
from hcsmoe.calibrate import LayerStats, expert_view
from hcsmoe.errors import UserError
from hcsmoe.layerwise import in_float32
from hcsmoe.plan import Group, LayerPlan, Plan

RIDGE = 1e-4  # relative to the mean diagonal of X^T X; keeps the fit well posed for rare experts
# Module attributes caching the routed-expert count in every supported family: num_experts (one-hot sizes,
# DeepSeek's group views, grouped_mm bins) and out_features (Phi-MoE's and Llama 4's nn.Linear routers).
COUNT_ATTRIBUTES = ("num_experts", "out_features")


def merge_rows(tensor: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """One slice per group: the weighted sum of its members' slices, computed in float32."""
    merged = []
    for group in groups:
        if len(group.members) == 1:
            merged.append(tensor[group.members[0]])
            continue
        merged.append(weighted_sum((tensor[j] for j in group.members), group.weights).to(tensor.dtype))
    return torch.stack(merged)


def weighted_sum(slices, weights: list[float]) -> torch.Tensor:
    """sum_i w_i * slice_i in float32, one member at a time in member order: the same bits whether the
    members come from a loaded model or are read one by one from disk (a large group never sits in memory)."""
    total = None
    for piece, weight in zip(slices, weights):
        term = piece.float() * torch.tensor(weight, dtype=torch.float32)
        total = term if total is None else total.add_(term)
    return total


def dominant_rows(tensor: torch.Tensor, groups: list[Group]) -> torch.Tensor:
    """The slice of each group's most frequently routed member (lowest index on ties)."""
    rows = []
    for group in groups:
        best = max(range(len(group.members)), key=lambda i: (group.frequencies[i], -group.members[i]))
        rows.append(tensor[group.members[best]])
    return torch.stack(rows)


def fitted_router_rows(weight: torch.Tensor, groups: list[Group], inputs: torch.Tensor) -> torch.Tensor:
    """Least-squares rows w_g with X w_g ~ logsumexp over members j of X w_j (float64 normal equations)."""
    if inputs.numel() == 0:
        raise UserError("the lsq router needs calibration inputs; re-run calibration or use --router average")
    x = inputs.double()
    w = weight.detach().double().cpu()
    logits = x @ w.T  # [N, E]
    gram = x.T @ x
    ridge = RIDGE * gram.diagonal().mean()
    system = gram + ridge * torch.eye(gram.shape[0], dtype=torch.float64)
    rows = []
    for group in groups:
        if len(group.members) == 1:
            rows.append(weight[group.members[0]])
            continue
        target = torch.logsumexp(logits[:, group.members], dim=1)  # [N]
        prior = (torch.tensor(group.weights, dtype=torch.float64) @ w[group.members])  # pull toward the average
        solution = torch.linalg.solve(system, x.T @ target + ridge * prior)
        rows.append(solution.to(weight.dtype).to(weight.device))
    return torch.stack(rows)


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
    correlation = (inverse[pool][:, pool] / scale[:, None] / scale[None, :]).abs()
    taken: list[int] = []
    for position in range(pool.numel()):
        if len(taken) == size:
            break
        if not taken or float(correlation[position, taken].max()) <= INDEPENDENT:
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


def neuron_layout(view: nn.Module, position: int, architecture: Architecture):
    """Expert `position` of `view` as [I, 2, H] gate/up pairs (bias column included) and [I, H] down columns."""
    return neurons_first(gate_up_with_bias(view, position, architecture), view.down_proj[position].float(),
                         architecture)


def members_view(experts: nn.Module, members: list[int]) -> nn.Module:
    """The experts module holding only `members`, in order, in float32 (what a neuron-level merge of one group
    reads; a model held in bf16 is upcast one group at a time)."""
    return expert_view(experts, {n: p[members].float()
                                 for n, p in expert_parameters(experts, experts.gate_up_proj.shape[0]).items()})


def merged_group(view: nn.Module, architecture: Architecture, group: Group, merge: str,
                 stats: LayerStats | None, top_k: int) -> dict[str, torch.Tensor]:
    """Every per-expert tensor of one merged expert, float32. `view` holds the group's members in order;
    a neuron-level merge (fix-dom, aligned, select) makes gate_up_proj (with its bias) and down_proj, every
    other tensor (e.g. down_proj_bias) is the weighted merge."""
    tensors = expert_parameters(view, len(group.members))
    merged: dict[str, torch.Tensor] = {}
    if merge != "weighted":
        if stats is None or stats.router_weight is None or stats.router_inputs.numel() == 0:
            raise UserError(f"{merge} merging needs calibration statistics with router inputs")
        gate_up, merged["down_proj"] = NEURON_MERGES[merge](view, architecture, group, stats, top_k)
        if "gate_up_proj_bias" in tensors:
            merged["gate_up_proj_bias"] = gate_up[-1] if architecture.transposed else gate_up[..., -1]
            gate_up = gate_up[:-1] if architecture.transposed else gate_up[..., :-1]
        merged["gate_up_proj"] = gate_up
    for name, tensor in tensors.items():
        if name not in merged:
            merged[name] = weighted_sum(tensor, group.weights)
    return merged


def router_rows(name: str, tensor: torch.Tensor, groups: list[Group], method: str, stats: LayerStats | None) -> torch.Tensor:
    if method == "dominant":
        return dominant_rows(tensor, groups)
    if method == "lsq" and name == "weight" and tensor.ndim == 2:
        if stats is None:
            raise UserError("the lsq router needs calibration statistics; use --router average to apply a plan alone")
        return fitted_router_rows(tensor, groups, stats.router_inputs)
    return merge_rows(tensor, groups)


def replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Swap a parameter (or buffer) for one of another shape, keeping its kind."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, value.contiguous())


def apply_layer(moe: MoELayer, architecture: Architecture, layer_plan: LayerPlan, plan: Plan,
                stats: LayerStats | None, top_k: int) -> None:
    """Shrink one MoE block in place to one expert and one router row per group."""
    e = moe.num_experts
    if layer_plan.num_experts != e:
        raise UserError(f"plan layer {layer_plan.layer} is for {layer_plan.num_experts} experts, the model has {e}")
    groups, router_method = layer_plan.groups, plan.router
    with torch.no_grad():
        if plan.merge == "weighted":
            for name, tensor in expert_parameters(moe.experts, e).items():
                replace_tensor(moe.experts, name, merge_rows(tensor.data, groups))
        else:
            tensors = expert_parameters(moe.experts, e)
            merged = [{n: t[g.members[0]] for n, t in tensors.items()} if len(g.members) == 1 else
                      merged_group(members_view(moe.experts, g.members), architecture, g, plan.merge, stats, top_k)
                      for g in groups]
            for name, tensor in tensors.items():
                replace_tensor(moe.experts, name, torch.stack([m[name].to(tensor.dtype) for m in merged]))
        for name, tensor in expert_parameters(moe.router, e).items():
            replace_tensor(moe.router, name, router_rows(name, tensor.data, groups, router_method, stats))
    set_count_attributes(moe, len(groups))


def set_count_attributes(moe: MoELayer, count: int) -> None:
    """Keep the modules' cached expert counts in step with the new K, so the model in memory runs exactly
    like the saved one reloaded (GPT-OSS one-hots over num_experts, DeepSeek views scores by num_experts)."""
    for module in (moe.block, moe.router, moe.experts):
        for name in COUNT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, count)


def layer_copy(moe: MoELayer) -> MoELayer:
    """A copy of an MoE layer to compress (a candidate of the per-layer choice): modules and small tensors
    copied, the routed experts' weights shared, since compressing replaces them and never writes into them."""
    return copy.deepcopy(moe, memo={id(tensor): tensor for tensor in moe.experts.parameters()})


def install(moe: MoELayer, compressed: MoELayer) -> None:
    """Give a layer the experts and router of a compressed copy of it (the per-layer choice's winner)."""
    for target, source in ((moe.experts, compressed.experts), (moe.router, compressed.router)):
        for name, tensor in list(source.named_parameters(recurse=False)) + list(source.named_buffers(recurse=False)):
            replace_tensor(target, name, tensor.data)
    set_count_attributes(moe, compressed.num_experts)


def apply_plan(
    model: nn.Module,
    architecture: Architecture,
    layers: list[MoELayer],
    plan: Plan,
    stats: list[LayerStats] | None = None,
    progress: bool = True,
) -> None:
    """Apply a plan to a loaded model in place; every MoE layer must have a layer plan."""
    plan.validate()
    by_index = {lp.layer: lp for lp in plan.layers}
    stats_by_index = {s.layer: s for s in stats or []}
    missing = [m.index for m in layers if m.index not in by_index]
    if missing:
        raise UserError(f"the plan has no entry for MoE layers {missing}")
    sizes = {len(by_index[m.index].groups) for m in layers}
    if len(sizes) != 1:
        raise UserError(f"the plan keeps different expert counts per layer ({sorted(sizes)}); the config allows one")
    top_k = int(getattr(model.config, architecture.top_k_key))
    for moe in tqdm(layers, desc="merging", unit="layer", disable=not progress):
        with in_float32(moe.block, keep=moe.experts):  # a model held in bf16: float32 arithmetic, a layer at a time
            apply_layer(moe, architecture, by_index[moe.index], plan, stats_by_index.get(moe.index), top_k)
    set_expert_count(model.config, architecture, sizes.pop())


def apply_plan_keeping_router(model: nn.Module, architecture: Architecture, layers: list[MoELayer], plan: Plan) -> None:
    """The paper's original behaviour, for comparison only: all E router rows stay and every expert slot
    holds its group's merged expert (the model is no smaller; it shows what a K-row router costs or gains)."""
    by_index = {lp.layer: lp for lp in plan.layers}
    with torch.no_grad():
        for moe in layers:
            groups = by_index[moe.index].groups
            slot_group = {member: g for g, group in enumerate(groups) for member in group.members}
            if len(slot_group) != moe.num_experts:
                raise UserError("keeping the full router needs a merging plan (every expert in a group)")
            slots = torch.tensor([slot_group[e] for e in range(moe.num_experts)])
            for name, tensor in expert_parameters(moe.experts, moe.num_experts).items():
                replace_tensor(moe.experts, name, merge_rows(tensor.data, groups)[slots])
