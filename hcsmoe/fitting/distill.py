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

The steps take their blocks from the first 7/8 of the calibration blocks; the last eighth is held out. The
divergence there is measured every CHECK_EVERY steps, the weights that measure lowest are the ones kept (the
layer-local fits' own if no step did better), and the steps stop when it has not fallen for PATIENCE checks:
the stage stops where it starts to fit the calibration text rather than the model (on the bundled Qwen2-MoE at
25% removed, 200 steps without this measured worse on held-out blocks than none).

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


CHECK_EVERY = 25  # Adam steps between two measures of the held-out divergence (each costs about two steps)
PATIENCE = 2  # checks in a row without a new lowest held-out divergence before the steps stop


@dataclass(frozen=True)
class DistillOptions:
    steps: int = 200  # Adam steps at most
    lr: float = 1e-4  # Adam's step size
    batch: int = 8  # calibration blocks per step

    def to_dict(self) -> dict:
        return asdict(self)


def distilled_parameters(model: nn.Module, architecture: Architecture) -> list[torch.Tensor]:
    """What the stage fits: every MoE layer's router (weight, and bias where it has one; not DeepSeek-V3's
    correction bias, a buffer its balancing rule sets) and routed experts' tensors (shared experts, attention,
    norms and embeddings stay as they are)."""
    tensors = []
    for moe in moe_layers(model, architecture):
        tensors += [*moe.experts.parameters(recurse=False), *moe.router.parameters(recurse=False)]
    return tensors


def block_divergence(student: nn.Module, teacher: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the next-token distributions on one block of token ids [1, L], mean per
    token (differentiable in the student's parameters that require a gradient)."""
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    log_probs = torch.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), dim=-1)
    return (target.exp() * (target - log_probs)).sum(-1).mean()


def mean_gradient(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor,
                  tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradient in `tensors` of the mean divergence over `blocks` [B, L]: one gradient per block on the
    workers, added in block order (so the sum does not depend on how many workers there are)."""
    def one(row: int) -> tuple[torch.Tensor, ...]:
        with torch.enable_grad():
            return torch.autograd.grad(block_divergence(student, teacher, blocks[row : row + 1]), tensors)

    gradient = None
    for first in range(0, blocks.shape[0], workers()):  # at most one gradient per worker held at once
        for grads in parallel_map(one, range(first, min(first + workers(), blocks.shape[0]))):
            gradient = list(grads) if gradient is None else [g.add_(h) for g, h in zip(gradient, grads)]
    return [g / blocks.shape[0] for g in gradient]


def held_out_divergence(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor) -> float:
    """The mean divergence over `blocks` [B, L], one block per worker at a time."""
    with torch.no_grad():
        return sum(parallel_map(lambda i: float(block_divergence(student, teacher, blocks[i : i + 1])),
                                range(blocks.shape[0]))) / blocks.shape[0]


def split_blocks(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks the steps take, held-out blocks): the last eighth held out (the last block at least; all of them
    are both where there is only one)."""
    held = max(1, blocks.shape[0] // 8)
    return (blocks[:-held], blocks[-held:]) if blocks.shape[0] > 1 else (blocks, blocks)


@timed("distill")
def distill(student: nn.Module, teacher: nn.Module, architecture: Architecture, blocks: torch.Tensor,
            options: DistillOptions, seed: int = 0, progress: bool = False) -> dict:
    """Fit the student's routers and routed experts (in place, float32) to the teacher's next-token
    distribution by up to options.steps Adam steps of options.batch calibration blocks each, taken in a seeded
    order (wrapping around) from the first 7/8 of `blocks` [N, L]. Every CHECK_EVERY steps the mean divergence
    on the last eighth (held out) is measured; the student ends with the weights that measured lowest there (its
    starting weights if none did better: the report then says "fallback"), and the steps stop once PATIENCE checks
    in a row have not improved on it. Returns the held-out divergence before and after, the step whose weights
    were kept, the steps taken and the tokens they took."""
    tensors = distilled_parameters(student, architecture)
    fitting, held_out = split_blocks(blocks)
    snapshot = lambda: [tensor.detach().clone() for tensor in tensors]
    best, kept_step, kept = held_out_divergence(student, teacher, held_out), 0, snapshot()  # step 0: the start
    before, taken = best, 0
    needed = {id(t) for t in tensors}
    flags = [(p, p.requires_grad) for p in student.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in needed)
    order = torch.randperm(fitting.shape[0], generator=torch.Generator().manual_seed(seed))
    batch_of = lambda step: fitting[order[(torch.arange(options.batch) + step * options.batch) % fitting.shape[0]]]
    optimizer = torch.optim.Adam(tensors, lr=options.lr, foreach=False)
    try:
        for step in tqdm(range(options.steps), desc="end-to-end fit", unit="step", disable=not progress):
            for tensor, grad in zip(tensors, mean_gradient(student, teacher, batch_of(step), tensors)):
                tensor.grad = grad
            optimizer.step()
            taken = step + 1
            if taken % CHECK_EVERY and taken != options.steps:
                continue
            divergence = held_out_divergence(student, teacher, held_out)
            if divergence < best:
                best, kept_step, kept = divergence, taken, snapshot()
            elif taken - kept_step >= PATIENCE * CHECK_EVERY:
                break
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    with torch.no_grad():
        for tensor, value in zip(tensors, kept):
            tensor.copy_(value)
    report = {"tokens": int(taken * options.batch * blocks.shape[1]), "held_out_blocks": int(held_out.shape[0]),
              "kl_before": float(f"{before:.6g}"), "kl_after": float(f"{best:.6g}"), "steps_taken": taken,
              "kept_step": kept_step}
    if kept_step == 0:
        report["fallback"] = "the held-out divergence never fell: the layer-local fits' weights were kept"
    return report
