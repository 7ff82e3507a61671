"""Stage 3, apply: narrower experts (--width). Every expert the plan made, merged or kept, keeps `width` of its
I neurons, so that the checkpoint's intermediate width shrinks with it: the form of "compress" that every
engine loads (no engine stores sparse or low-rank experts; all of them load a smaller moe_intermediate_size).

The neurons go as the select merge's do (apply/neurons.least_squares_subset): one at a time (in rounds for
large experts), always the one whose loss the remaining neurons' fitted down columns make up for best, on the
calibration inputs the original router sent to the expert's group, with the group's summed gate; a neuron
that another one duplicates goes first. The kept neurons' gate/up rows are unchanged, their down columns
fitted; the fitting stage then fits the narrower layer to the original as it fits any compressed layer.
"""

from __future__ import annotations

import torch
from torch import nn

from hcsmoe.apply.neurons import (
    gate_up_tensors,
    gated_intermediate,
    least_squares_subset,
    neuron_layout,
    neurons_back,
    routed_gates,
)
from hcsmoe.calibration.statistics import LayerStats, expert_view
from hcsmoe.checkpoints.architectures import Architecture, expert_parameters
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import Group

# Neurons a narrower expert keeps come in multiples of this: transformers' grouped expert kernels read rows of
# 16 bytes (8 bf16 values; a width of 46 fails there with "strides should be multiple of 16 bytes"), and an MXFP4
# checkpoint stores its down projections in blocks of 32 inputs.
WIDTH_MULTIPLE = 8
MXFP4_WIDTH_MULTIPLE = 32


def resolve_width(width: float | None, full: int, multiple: int = WIDTH_MULTIPLE) -> int | None:
    """--width as a neuron count: a ratio of I for values up to 1 (rounded down to a multiple of `multiple`, at
    least one multiple), a count above (which must be such a multiple); None when nothing narrows."""
    if width is None:
        return None
    count = round(width * full) if width <= 1 else int(width)
    if width <= 0 or (width > 1 and width != int(width)) or count < 1:
        raise UserError(f"--width is a fraction of the experts' {full} neurons in (0, 1] or a count of them, got {width}")
    if count > full:
        raise UserError(f"--width {count}: the experts have {full} neurons; choose at most {full}")
    if count == full:
        return None
    if width <= 1:
        count = max(multiple, count // multiple * multiple)
    elif count % multiple:
        below, above = count // multiple * multiple, (count // multiple + 1) * multiple
        raise UserError(f"--width {count}: engines need a multiple of {multiple} neurons (transformers' grouped expert "
                        f"kernels read 16-byte rows; MXFP4 stores blocks of 32); choose {below or above} or "
                        f"{min(above, full)}")
    return count if count < full else None


@torch.no_grad()
def narrowed_expert(tensors: dict[str, torch.Tensor], architecture: Architecture, group: Group,
                    stats: LayerStats | None, top_k: int, width: int, experts: nn.Module) -> dict[str, torch.Tensor]:
    """One expert's tensors (each [...], no expert axis) cut to `width` neurons, in their own dtype; computed
    in float32 (float64 for the least squares) whatever that dtype, so every runner gets the same bits."""
    if stats is None or stats.router_weight is None or stats.router_inputs.numel() == 0:
        raise UserError("--width chooses neurons on calibration inputs: it needs calibration statistics")
    view = expert_view(experts, {name: tensor.unsqueeze(0).float() for name, tensor in tensors.items()})
    x, gates = routed_gates(stats, group.members, top_k)
    x, gate = x.to(view.down_proj.device), gates.sum(1, keepdim=True).to(view.down_proj.device)
    pairs, down = neuron_layout(view, 0, architecture)
    features = gated_intermediate(view, architecture, x, gate)[0].double()
    kept, readout = least_squares_subset(features, features @ down.double(), down.double(), width)
    gate_up, narrowed = neurons_back(pairs[kept], readout.float(), architecture)
    built = gate_up_tensors(gate_up, "gate_up_proj_bias" in tensors, architecture) | {"down_proj": narrowed}
    return {name: built.get(name, tensor).to(tensor.dtype) for name, tensor in tensors.items()}


def narrowed_layer(experts: nn.Module, architecture: Architecture, groups: list[Group], stats: LayerStats | None,
                   top_k: int, width: int) -> dict[str, torch.Tensor]:
    """Every expert of a compressed layer (one per group) cut to `width` neurons: its new tensors, stacked. Each
    expert goes into its slot as it is made (a list stacked at the end would hold the layer twice)."""
    tensors = expert_parameters(experts, len(groups))
    stacked: dict[str, torch.Tensor] = {}
    for g, group in enumerate(groups):
        own = narrowed_expert({name: t[g] for name, t in tensors.items()}, architecture, group, stats, top_k, width,
                              experts)
        for name, tensor in own.items():
            if name not in stacked:
                stacked[name] = torch.empty(len(groups), *tensor.shape, dtype=tensor.dtype)
            stacked[name][g] = tensor
    return stacked
