"""Stage 3, apply: weight surgery. Each group of a plan becomes one expert and one router row.

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
from torch import nn
from tqdm.auto import tqdm

from hcsmoe.apply.narrow import narrowed_layer
from hcsmoe.apply.neurons import NEURON_MERGES, gate_up_tensors
from hcsmoe.calibration.statistics import LayerStats, expert_view
from hcsmoe.checkpoints.architectures import (
    Architecture,
    MoELayer,
    expert_parameters,
    expert_width,
    set_expert_count,
    set_width_attributes,
)
from hcsmoe.checkpoints.loading import in_float32
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import Group, LayerPlan, Plan
from hcsmoe.timing import timed

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
        merged |= gate_up_tensors(gate_up, "gate_up_proj_bias" in tensors, architecture)
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


@timed("apply")
def apply_layer(moe: MoELayer, architecture: Architecture, layer_plan: LayerPlan, plan: Plan,
                stats: LayerStats | None, top_k: int) -> None:
    """Shrink one MoE block in place to one expert and one router row per group (and each expert to
    plan.width neurons, when the plan narrows them: apply/narrow.py)."""
    e = moe.num_experts
    if layer_plan.num_experts != e:
        raise UserError(f"plan layer {layer_plan.layer} is for {layer_plan.num_experts} experts, the model has {e}")
    groups, router_method = layer_plan.groups, plan.router
    with torch.no_grad():
        if plan.merge == "weighted":
            for name, tensor in expert_parameters(moe.experts, e).items():
                replace_tensor(moe.experts, name, merge_rows(tensor.data, groups))
        else:  # each group's expert goes into its slot as it is made: never all of them in float32 at once
            tensors = expert_parameters(moe.experts, e)
            compressed = {name: torch.empty(len(groups), *tensor.shape[1:], dtype=tensor.dtype)
                          for name, tensor in tensors.items()}
            for slot, g in enumerate(groups):
                own = ({n: t[g.members[0]] for n, t in tensors.items()} if len(g.members) == 1 else
                       merged_group(members_view(moe.experts, g.members), architecture, g, plan.merge, stats, top_k))
                for name, tensor in compressed.items():
                    tensor[slot] = own[name].to(tensor.dtype)
            for name, tensor in compressed.items():
                replace_tensor(moe.experts, name, tensor)
        for name, tensor in expert_parameters(moe.router, e).items():
            replace_tensor(moe.router, name, router_rows(name, tensor.data, groups, router_method, stats))
        if plan.width is not None and plan.width < expert_width(moe.experts, architecture):
            for name, tensor in narrowed_layer(moe.experts, architecture, groups, stats, top_k, plan.width).items():
                replace_tensor(moe.experts, name, tensor)
            set_width_attributes(moe.experts, plan.width)
            layer_plan.details["width"] = plan.width
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
