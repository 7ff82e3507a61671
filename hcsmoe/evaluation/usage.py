"""How often each expert is routed to: the check that no expert is dead, and a picture of specialisation."""

from __future__ import annotations

import torch
from torch import nn

from hcsmoe.checkpoints.architectures import architecture_for, moe_layers


@torch.no_grad()
def routing_counts(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Top-k selections per expert for every MoE layer over token blocks [N, L]."""
    layers = moe_layers(model, architecture_for(model.config))
    counts = {m.index: torch.zeros(m.num_experts, dtype=torch.long) for m in layers}

    def counter(index: int):
        def hook(module, args, output):
            counts[index] += torch.bincount(output[2].reshape(-1).cpu(), minlength=len(counts[index]))
        return hook

    hooks = [m.router.register_forward_hook(counter(m.index)) for m in layers]
    try:
        for batch in blocks.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def share_of_uniform(counts: torch.Tensor) -> torch.Tensor:
    """Each expert's routing share divided by the uniform share 1/E (1.0 = perfectly balanced)."""
    return counts.double() / counts.sum() * len(counts)
