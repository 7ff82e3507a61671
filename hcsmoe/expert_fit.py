"""Stage 5: fit the compressed layer's experts, gate/up and down projections together, to the original layer.

The refit (stage 4) makes the down projections the least-squares best readout of features it cannot
change: each kept or merged expert's gate/up neurons stay those of the plan. Those neurons were made for
the original experts' tokens; a merged expert now serves all of its members' tokens, and a kept expert
those of the dropped experts routed to it. Letting the gate/up weights move too gives the compressed
block more of the original block's function at the same size (measured in the README).

The block output is not linear in the gate/up weights, so there is no closed form: a few iterations of
L-BFGS (full batch, strong-Wolfe line search) minimise the relative squared error of the compressed
block's routed output against the original's, on calibration tokens, starting from the refit's solution,
with the routing of the compressed router held fixed. It is local to one layer, like the refit: no
gradient ever crosses layers, and only the layer's expert tensors move. With `sample` (--refit-tokens) the
tokens are taken evenly spaced over all calibration blocks, which bounds the cost on large layers.
"""

from __future__ import annotations

import torch
from torch import nn

from hcsmoe.adapters import Architecture, MoELayer, expert_intermediate, expert_output_from_intermediate
from hcsmoe.calibrate import BlockTokens, expert_view, routed, token_spans

FITTED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
CHUNK_TOKENS = 8192  # tokens per forward/backward pass: memory ~ CHUNK_TOKENS x top-k x (2H + 6I) x 4 bytes


def evenly_spaced(total: int, count: int) -> torch.Tensor:
    """`count` token positions spread over all `total` (all of them when count covers the total)."""
    if count <= 0 or count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def per_expert_tokens(moe: MoELayer, architecture: Architecture, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [K, M], gate weights [K, M]): each expert's tokens under the compressed router, padded
    with gate 0 to the busiest expert's M, so that all experts run as one batched matrix product."""
    routing, num_experts = routed(moe, architecture, inputs), moe.experts.down_proj.shape[0]
    lists = [routing.tokens_of(expert) for expert in range(num_experts)]
    width = max(1, max(int(token.numel()) for token, _ in lists))
    positions = torch.zeros(num_experts, width, dtype=torch.long, device=inputs.device)
    gates = torch.zeros(num_experts, width, device=inputs.device)
    for expert, (token, gate) in enumerate(lists):
        positions[expert, : token.numel()] = token
        gates[expert, : token.numel()] = gate
    return positions, gates


def padded_block_output(experts: nn.Module, architecture: Architecture, tensors: dict[str, torch.Tensor],
                        inputs: torch.Tensor, positions: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """The compressed block's routed output [T, H] with expert tensors `tensors` (differentiable): every
    expert on its own padded tokens inputs[positions], scaled by its gates, summed back per token."""
    view = expert_view(experts, tensors)
    x = inputs[positions]
    if architecture.gate_on_input:
        out = expert_output_from_intermediate(view, architecture, expert_intermediate(view, architecture,
                                                                                      x * gates.unsqueeze(-1)))
    else:
        out = expert_output_from_intermediate(view, architecture, expert_intermediate(view, architecture, x))
        out = out * gates.unsqueeze(-1)
    return torch.zeros(inputs.shape[0], out.shape[-1], device=out.device).index_add(0, positions.reshape(-1), out.reshape(-1, out.shape[-1]))


def fit_experts(moe: MoELayer, architecture: Architecture, tokens: BlockTokens, steps: int,
                sample: int) -> dict:
    """Fit the layer's expert tensors in place (float32) by `steps` L-BFGS iterations on `sample` evenly
    spaced calibration tokens; returns the relative squared error of the routed output before and after.
    Gradients are accumulated over chunks of CHUNK_TOKENS tokens, so memory stays bounded."""
    experts = moe.experts
    chosen = evenly_spaced(tokens.inputs.shape[0], sample)
    device = experts.down_proj.device
    inputs, target = (t[chosen.to(t.device)].detach().float().to(device) for t in (tokens.inputs, tokens.routed))
    chunks = [(begin, stop, *per_expert_tokens(moe, architecture, inputs[begin:stop]))
              for begin, stop in token_spans(len(chosen), CHUNK_TOKENS)]
    energy = max(float(target.double().pow(2).sum()), 1e-30)
    tensors = {name: getattr(experts, name).detach().float().clone().requires_grad_(True)
               for name in FITTED if getattr(experts, name, None) is not None}
    everything = dict(experts._parameters) | tensors

    def error(backward: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for begin, stop, positions, gates in chunks:
            predicted = padded_block_output(experts, architecture, everything, inputs[begin:stop], positions, gates)
            value = (target[begin:stop] - predicted).pow(2).sum() / energy
            if backward:
                value.backward()
            total += float(value.detach())
        return total

    optimizer = torch.optim.LBFGS(list(tensors.values()), lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return error(backward=True)

    with torch.no_grad():
        before = float(error(backward=False))
    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        after = float(error(backward=False))
        if after < before:  # never keep a worse layer (L-BFGS's line search should not give one)
            for name, tensor in tensors.items():
                getattr(experts, name).data.copy_(tensor.detach().to(getattr(experts, name).dtype))
    return {"steps": steps, "tokens": int(chosen.numel()), "error_before": round(before, 6),
            "error_after": round(min(before, after), 6)}
