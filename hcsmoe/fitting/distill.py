"""Stage 4, fit, end to end (opt-in, --distill-steps): after every MoE layer is compressed and fitted on its
own, fit the routers and routed experts of all MoE layers together to the original model's next-token
distribution on the calibration text.

The layer-local fits (router fit, refit, expert fit) each make one compressed layer reproduce the original
layer's output on the tokens it sees; none of them knows which of a layer's errors the model's output is
sensitive to, and none moves a router toward what the experts after it now compute. This stage minimises
KL(original || compressed) of the next-token distributions, averaged over calibration tokens, by Adam, with
every weight outside the MoE layers' routers and routed experts held as it is. It needs the original model
in memory beside the compressed one, and a forward and backward pass of the whole model per step: a few
minutes for the bundled models on two CPU cores, a GPU's work for a real model (docs/choosing-the-default.md,
"End to end").

Deterministic at any thread count: each step's gradient is the sum, in block order, of one gradient per
calibration block, each computed whole on one worker (hcsmoe/workers.py), and the blocks each step takes
come from a permutation seeded by the recipe's seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm import tqdm

from hcsmoe.checkpoints.architectures import Architecture, moe_layers
from hcsmoe.timing import timed
from hcsmoe.workers import parallel_map, workers


@dataclass(frozen=True)
class DistillOptions:
    steps: int = 200  # Adam steps
    lr: float = 1e-4  # Adam's step size
    batch: int = 8  # calibration blocks per step

    def to_dict(self) -> dict:
        return asdict(self)


def distilled_parameters(model: nn.Module, architecture: Architecture) -> list[torch.Tensor]:
    """What the stage fits: every MoE layer's router weight and routed experts' tensors (shared experts,
    attention, norms and embeddings stay as they are)."""
    tensors = []
    for moe in moe_layers(model, architecture):
        tensors += [*moe.experts.parameters(recurse=False), moe.router.weight]
    return tensors


def block_divergence(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions on one block of token ids [1, L], mean per
    token (differentiable in the student's parameters that require a gradient)."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    log_probs = torch.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    return (target.exp() * (target - log_probs)).sum(-1).mean()


def summed_gradient(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor,
                    tensors: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """The mean divergence over `blocks` [B, L] and its gradient in `tensors`: one gradient per block on the
    workers, added in block order (so the sum does not depend on how many workers there are)."""
    def one(row: int) -> tuple[float, tuple[torch.Tensor, ...]]:
        with torch.enable_grad():
            divergence = block_divergence(student, teacher, blocks[row : row + 1])
            return float(divergence.detach()), torch.autograd.grad(divergence, tensors)

    total, gradient = 0.0, None
    for first in range(0, blocks.shape[0], workers()):  # at most one gradient per worker held at once
        for divergence, grads in parallel_map(one, range(first, min(first + workers(), blocks.shape[0]))):
            total += divergence
            gradient = list(grads) if gradient is None else [g.add_(h) for g, h in zip(gradient, grads)]
    return total / blocks.shape[0], [g / blocks.shape[0] for g in gradient]


@timed("distill")
def distill(student: nn.Module, teacher: nn.Module, architecture: Architecture, blocks: torch.Tensor,
            options: DistillOptions, seed: int = 0, progress: bool = False) -> dict:
    """Fit the student's routers and routed experts (in place, float32) to the teacher's next-token
    distribution on the calibration `blocks` [N, L] by options.steps Adam steps of options.batch blocks each
    (in a seeded order, wrapping around); returns the mean divergence on the first step's
    blocks before and after, and the tokens it took."""
    tensors = distilled_parameters(student, architecture)
    needed = {id(t) for t in tensors}
    flags = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in needed)
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))
    batch_of = lambda step: blocks[order[(torch.arange(options.batch) + step * options.batch) % blocks.shape[0]]]
    optimizer = torch.optim.Adam(tensors, lr=options.lr, foreach=False)
    before = None  # the first step's divergence, before any update
    try:
        for step in tqdm(range(options.steps), desc="end-to-end fit", unit="step", disable=not progress):
            divergence, gradient = summed_gradient(student, teacher, batch_of(step), tensors)
            before = divergence if before is None else before
            for tensor, grad in zip(tensors, gradient):
                tensor.grad = grad
            optimizer.step()
        with torch.no_grad():
            first = batch_of(0)
            after = sum(float(block_divergence(student, teacher, first[i : i + 1])) for i in range(first.shape[0]))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    return {"tokens": int(options.steps * options.batch * blocks.shape[1]), "kl_before": round(before, 6),
            "kl_after": round(after / options.batch, 6)}
