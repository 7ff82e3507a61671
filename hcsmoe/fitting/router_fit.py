"""Stage 4, fit (the router fit, first): fit the K-row router to the original routing, gathered per
compressed expert.

On every calibration token x the original router spreads probability p_j(x) over the E experts. After
compression, expert g stands for its members (and, in a pruning plan, for the dropped experts it absorbs:
each dropped expert hands its mass to the kept expert whose mean output is most like its own), so the
routing mass it should get is q_g(x) = sum of p_j(x) over those experts. The K router rows W' are fitted
so that softmax(W' x) matches q(x):

    min_W'  mean_x KL(q(x) || softmax(W' x + b))  +  beta/2 * s * || W' - W'_0 ||^2

a convex soft-label logistic regression (b: the router's bias, kept; s: the mean squared input
coordinate, so beta is scale-free), solved by L-BFGS from W'_0, the plan's own rows. For a pruning plan
without absorption the kept rows already solve it exactly; what the fit adds is where the dropped
experts' tokens go, and for merged groups a row that carries all of its members' mass (the log-sum-exp
the `lsq` router approximates row by row, here fitted jointly and weighted where routing happens).
Softmax-scored routers only: sigmoid scoring (DeepSeek-V3, Llama 4) has no such mass to share.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hcsmoe.calibration.statistics import BlockTokens, LayerStats
from hcsmoe.checkpoints.architectures import Architecture, MoELayer
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import LayerPlan
from hcsmoe.timing import timed


@dataclass(frozen=True)
class RouterFitOptions:
    beta: float = 1e-3  # pull toward the plan's rows, relative to the mean squared input coordinate
    iterations: int = 50  # L-BFGS iterations
    absorb: bool = False  # dropped experts' mass goes to their most similar kept expert (else it is renormalised away)
    only_if_softmax: bool = False  # skip, instead of refusing, a family whose router is not a softmax
    max_tokens: int = 16384  # calibration tokens the fit uses (evenly spaced): K x H unknowns need no more

    def to_dict(self) -> dict:
        return asdict(self)


def check_router_fit(architecture: Architecture) -> None:
    if architecture.routing != "softmax":
        raise UserError(f"the router fit needs a softmax router; {architecture.name} scores experts with "
                        f"{architecture.routing}: drop --fit-router")


def mass_owners(layer_plan: LayerPlan, stats: LayerStats, absorb: bool) -> torch.Tensor:
    """For every original expert, the compressed expert that receives its routing mass (-1: nobody)."""
    owner = torch.full((layer_plan.num_experts,), -1, dtype=torch.long)
    for index, group in enumerate(layer_plan.groups):
        owner[group.members] = index
    dropped = layer_plan.dropped
    if dropped and absorb:
        outputs = torch.nn.functional.normalize(stats.mean_output.double(), dim=1)
        centres = torch.stack([torch.tensor(g.weights, dtype=torch.float64) @ outputs[g.members]
                               for g in layer_plan.groups])
        nearest = (outputs[dropped] @ torch.nn.functional.normalize(centres, dim=1).T).argmax(dim=1)
        owner[dropped] = nearest
    return owner


def routing_targets(scores: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """q [T, K]: each compressed expert's share of the original routing mass (renormalised over owned mass)."""
    owned = owner >= 0
    q = torch.zeros(scores.shape[0], k, dtype=torch.float64)
    q.index_add_(1, owner[owned], scores[:, owned].double())
    return q / q.sum(1, keepdim=True).clamp(min=1e-30)


def fit_rows(x: torch.Tensor, q: torch.Tensor, start: torch.Tensor, bias: torch.Tensor | None,
             options: RouterFitOptions) -> tuple[torch.Tensor, int]:
    """Soft-label multinomial logistic regression of q on x, from the rows `start`, by L-BFGS (float64);
    returns the fitted rows and how many times the objective was evaluated."""
    x64 = x.double()
    scale = float(x64.pow(2).mean())
    w0 = start.double()
    delta = torch.zeros_like(w0).requires_grad_(True)
    offset = bias.double() if bias is not None else torch.zeros(w0.shape[0], dtype=torch.float64)
    entropy = float((q * q.clamp(min=1e-300).log()).sum(1).mean())
    optimizer = torch.optim.LBFGS([delta], lr=1.0, max_iter=options.iterations, history_size=20,
                                  tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        log_probs = torch.log_softmax(x64 @ (w0 + delta).T + offset, dim=1)
        loss = entropy - (q * log_probs).sum(1).mean() + 0.5 * options.beta * scale * delta.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return (w0 + delta.detach()).to(start.dtype), int(optimizer.state[delta]["func_evals"])


@timed("router fit")
def fit_router(moe: MoELayer, architecture: Architecture, layer_plan: LayerPlan, stats: LayerStats,
               block: BlockTokens, options: RouterFitOptions) -> dict:
    """Refit the compressed layer's router rows in place; returns the mean KL to the target before and after.
    A plan that only drops experts (without absorption) needs no fit: its kept rows already give the target."""
    check_router_fit(architecture)
    if all(len(g.members) == 1 for g in layer_plan.groups) and not (options.absorb and layer_plan.dropped):
        return {"skipped": "no merged expert"}
    owner = mass_owners(layer_plan, stats, options.absorb)
    step = max(1, block.inputs.shape[0] // options.max_tokens)
    q = routing_targets(block.scores[::step], owner, len(layer_plan.groups))
    weight = moe.router.weight
    bias = getattr(moe.router, "bias", None)
    x = block.inputs[::step].float()

    def kl(rows: torch.Tensor) -> float:
        logits = x.double() @ rows.double().T + (bias.double() if bias is not None else 0)
        return float((q * (q.clamp(min=1e-300).log() - torch.log_softmax(logits, dim=1))).sum(1).mean())

    before = kl(weight.data)
    fitted, evaluations = fit_rows(x, q, weight.data.float(), bias.data.float() if bias is not None else None, options)
    if not bool(torch.isfinite(fitted).all()):
        return {"kl_before": round(before, 6), "fallback": "non-finite values: the rows were kept as the plan made them"}
    weight.data.copy_(fitted.to(weight.dtype))
    report = {"kl_before": round(before, 6), "kl_after": round(kl(weight.data), 6), "tokens": int(x.shape[0]),
              "evaluations": evaluations}
    if layer_plan.dropped and options.absorb:
        report["absorbed_by"] = {str(j): int(owner[j]) for j in layer_plan.dropped}
    return report
