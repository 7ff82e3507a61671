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
from hcsmoe.calibrate import BlockTokens, expert_slices, expert_view, routed, token_spans

FITTED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
CHUNK_TOKENS = 8192  # tokens per forward/backward pass: memory ~ CHUNK_TOKENS x top-k x (2H + 6I) x 4 bytes


def evenly_spaced(total: int, count: int) -> torch.Tensor:
    """`count` token positions spread over all `total` (all of them when count covers the total)."""
    if count <= 0 or count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def per_expert_tokens(moe: MoELayer, architecture: Architecture, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(positions, gate weights) of each expert's tokens under the compressed router, expert by expert."""
    routing = routed(moe, architecture, inputs)
    return [routing.tokens_of(expert) for expert in range(moe.experts.down_proj.shape[0])]


def block_output(experts: nn.Module, architecture: Architecture, tensors: list[dict[str, torch.Tensor]],
                 inputs: torch.Tensor, tokens: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The compressed block's routed output [T, H] (differentiable): expert e, with its tensors `tensors[e]`
    (each [1, ...]), runs on its own tokens only, scaled by their gates; the outputs are summed back per
    token in ascending expert order. Running each expert on exactly its tokens, rather than all experts in
    one batched product padded to the busiest one, does 2-3 times less arithmetic on routers as uneven as
    the bundled models' (the busiest expert takes 2-2.7 times the mean)."""
    outputs = []
    for own, (positions, gates) in zip(tensors, tokens):
        view, x = expert_view(experts, own), inputs[positions].unsqueeze(0)
        if architecture.gate_on_input:
            h = expert_intermediate(view, architecture, x * gates.view(1, -1, 1))
            outputs.append(expert_output_from_intermediate(view, architecture, h)[0])
        else:
            h = expert_intermediate(view, architecture, x)
            outputs.append(expert_output_from_intermediate(view, architecture, h)[0] * gates.unsqueeze(-1))
    positions = torch.cat([p for p, _ in tokens])
    return torch.zeros(inputs.shape[0], outputs[0].shape[-1], device=inputs.device).index_add(0, positions, torch.cat(outputs))


def one_expert(experts: nn.Module, expert: int, fitted: list[str]) -> dict[str, torch.Tensor]:
    """Expert `expert`'s tensors ([1, ...] slices), those in `fitted` as float32 leaves of their own: each
    expert's gradient is then its own tensor, not a slice's scattered into a copy of the whole layer."""
    own = expert_slices(experts, expert)
    return own | {name: own[name].detach().float().clone().requires_grad_(True) for name in fitted}


def fit_experts(moe: MoELayer, architecture: Architecture, tokens: BlockTokens, steps: int,
                sample: int) -> dict:
    """Fit the layer's expert tensors in place (float32) by `steps` L-BFGS iterations on `sample` evenly
    spaced calibration tokens; returns the relative squared error of the routed output before and after.
    Gradients are accumulated over chunks of CHUNK_TOKENS tokens, so memory stays bounded."""
    experts = moe.experts
    chosen = evenly_spaced(tokens.inputs.shape[0], sample)
    device = experts.down_proj.device
    inputs, target = (t[chosen.to(t.device)].detach().float().to(device) for t in (tokens.inputs, tokens.routed))
    chunks = [(begin, stop, per_expert_tokens(moe, architecture, inputs[begin:stop]))
              for begin, stop in token_spans(len(chosen), CHUNK_TOKENS)]
    energy = max(float(target.double().pow(2).sum()), 1e-30)
    fitted = [name for name in FITTED if getattr(experts, name, None) is not None]
    tensors = [one_expert(experts, e, fitted) for e in range(experts.down_proj.shape[0])]

    def error(backward: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for begin, stop, routing in chunks:
            predicted = block_output(experts, architecture, tensors, inputs[begin:stop], routing)
            value = (target[begin:stop] - predicted).pow(2).sum() / energy
            if backward:
                value.backward()
            total += float(value.detach())
        return total

    optimizer = torch.optim.LBFGS([own[name] for own in tensors for name in fitted], lr=1.0, max_iter=steps, history_size=20,
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
            for name in fitted:
                stored = getattr(experts, name)
                stored.data.copy_(torch.cat([own[name].detach() for own in tensors]).to(stored.dtype))
    return {"steps": steps, "tokens": int(chosen.numel()), "error_before": round(before, 6),
            "error_after": round(min(before, after), 6)}
