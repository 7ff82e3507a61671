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

Sigmoid-scored routers (DeepSeek-V3) score every expert on its own, s_j(x) = sigmoid(w_j x), and choose the
top-k of s_j + c_j (c: the correction bias) within the best expert groups. A compressed expert should score
as if any of its experts had: its target is t_g(x) = 1 - prod_j (1 - s_j(x)) over the experts it stands for
(an expert kept alone keeps its own score), fitted by the soft-label logistic regression

    min_W'  mean_x sum_g BCE(t_g(x), sigmoid(w'_g x))  +  beta/2 * s * || W' - W'_0 ||^2

Then the correction bias is fitted so that each compressed expert is chosen as often as its experts were
(their summed top-k counts), by DeepSeek-V3's own balancing rule (c_g moves up for an expert chosen less than
its target, down for one chosen more) on the calibration tokens, its step shrinking each round; the router
module itself chooses, so the group limit is respected. Llama 4's router (no correction bias, scores only on
the chosen experts) is not fitted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from hcsmoe.calibration.statistics import BlockTokens, LayerStats
from hcsmoe.checkpoints.architectures import Architecture, MoELayer, route
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import LayerPlan
from hcsmoe.timing import timed

BIAS_ROUNDS = 100  # rounds of the correction bias's balancing
BIAS_STEP = 0.02  # its first step (sigmoid scores lie in (0, 1)); each round's step is BIAS_DECAY times the last
BIAS_DECAY = 0.97


@dataclass(frozen=True)
class RouterFitOptions:
    beta: float = 1e-3  # pull toward the plan's rows, relative to the mean squared input coordinate
    iterations: int = 50  # L-BFGS iterations
    absorb: bool = False  # dropped experts' mass goes to their most similar kept expert (else it is renormalised away)
    only_if_softmax: bool = False  # skip, instead of refusing, a family whose router this fit does not cover
    max_tokens: int = 16384  # calibration tokens the fit uses (evenly spaced): K x H unknowns need no more
    # Fit sigmoid routers too (DeepSeek-V3). False in plans written before that fit existed, which re-apply as made.
    sigmoid: bool = True
    choice_bias: bool = True  # sigmoid routers: fit the correction bias to the compressed experts' choice rates too

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RouterFitOptions:
        return cls(**{"sigmoid": False} | data)

    def covers(self, architecture: Architecture) -> bool:
        return architecture.routing == "softmax" or (self.sigmoid and architecture.routing == "sigmoid")


def check_router_fit(architecture: Architecture, options: RouterFitOptions) -> None:
    if not options.covers(architecture):
        raise UserError(f"the router fit does not cover {architecture.name}'s routing ({architecture.routing} "
                        f"scores): drop --fit-router")


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


def score_targets(scores: torch.Tensor, owner: torch.Tensor, k: int) -> torch.Tensor:
    """t [T, K] for sigmoid scores: each compressed expert's chance that at least one of its experts scores,
    1 - prod (1 - s_j) (an expert that owns only itself keeps its own score)."""
    owned = owner >= 0
    log_missed = torch.zeros(scores.shape[0], k, dtype=torch.float64)
    log_missed.index_add_(1, owner[owned], torch.log1p(-scores[:, owned].double().clamp(max=1 - 1e-12)))
    return -torch.expm1(log_missed)


def softmax_divergence(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean KL(q || softmax(logits)) over tokens."""
    return (q * (q.clamp(min=1e-300).log() - torch.log_softmax(logits, dim=1))).sum(1).mean()


def sigmoid_divergence(logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the summed binary KL(t_g || sigmoid(logit_g))."""
    entropy = t * t.clamp(min=1e-300).log() + (1 - t) * (1 - t).clamp(min=1e-300).log()
    return (entropy - t * torch.nn.functional.logsigmoid(logits) - (1 - t) * torch.nn.functional.logsigmoid(-logits)
            ).sum(1).mean()


def fit_rows(x: torch.Tensor, q: torch.Tensor, start: torch.Tensor, bias: torch.Tensor | None,
             options: RouterFitOptions, divergence=softmax_divergence) -> tuple[torch.Tensor, int]:
    """Soft-label logistic regression of q on x (multinomial for softmax_divergence, one binary one per row
    for sigmoid_divergence), from the rows `start`, by L-BFGS (float64); returns the fitted rows and how many
    times the objective was evaluated."""
    x64 = x.double()
    scale = float(x64.pow(2).mean())
    w0 = start.double()
    delta = torch.zeros_like(w0).requires_grad_(True)
    offset = bias.double() if bias is not None else torch.zeros(w0.shape[0], dtype=torch.float64)
    optimizer = torch.optim.LBFGS([delta], lr=1.0, max_iter=options.iterations, history_size=20,
                                  tolerance_grad=1e-10, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = divergence(x64 @ (w0 + delta).T + offset, q) + 0.5 * options.beta * scale * delta.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return (w0 + delta.detach()).to(start.dtype), int(optimizer.state[delta]["func_evals"])


def chosen_share(moe: MoELayer, architecture: Architecture, x: torch.Tensor) -> torch.Tensor:
    """[K]: how many times per token the router chooses each expert (sums to top-k)."""
    indices = route(moe, architecture, x)[2]
    return torch.bincount(indices.reshape(-1), minlength=moe.router.weight.shape[0]).double() / x.shape[0]


def fit_choice_bias(moe: MoELayer, architecture: Architecture, x: torch.Tensor, target: torch.Tensor) -> dict:
    """Move the correction bias (in place) by DeepSeek-V3's balancing rule until each compressed expert is
    chosen about as often as `target` [K] says: BIAS_ROUNDS rounds of c += step * sign(target - chosen), the
    step shrinking by BIAS_DECAY each round; the bias that came closest (half the L1 distance) is kept."""
    bias, step = moe.router.e_score_correction_bias, BIAS_STEP
    tried = []  # (distance, round, bias) of every bias tried
    for round_ in range(BIAS_ROUNDS + 1):
        gap = target - chosen_share(moe, architecture, x)
        tried.append((float(gap.abs().sum() / 2), round_, bias.detach().clone()))
        bias.data += step * torch.sign(gap).to(bias.dtype)
        step *= BIAS_DECAY
    best = min(tried, key=lambda t: t[:2])
    bias.data.copy_(best[2])
    return {"choice_error_before": round(tried[0][0], 6), "choice_error_after": round(best[0], 6)}


def target_choice_share(stats: LayerStats, owner: torch.Tensor, k: int, top_k: int) -> torch.Tensor:
    """[K]: how often per token each compressed expert should be chosen: its experts' share of the original
    top-k choices (summed), scaled to top-k choices per token."""
    owned = owner >= 0
    counts = torch.zeros(k, dtype=torch.float64).index_add_(0, owner[owned], stats.counts[owned].double())
    return counts / counts.sum().clamp(min=1e-30) * top_k


@timed("router fit")
def fit_router(moe: MoELayer, architecture: Architecture, layer_plan: LayerPlan, stats: LayerStats,
               block: BlockTokens, options: RouterFitOptions) -> dict:
    """Refit the compressed layer's router rows in place (and a sigmoid router's correction bias); returns the
    mean divergence from the target before and after. A plan that only drops experts (without absorption)
    needs no fit: its kept rows already give the target."""
    check_router_fit(architecture, options)
    if all(len(g.members) == 1 for g in layer_plan.groups) and not (options.absorb and layer_plan.dropped):
        return {"skipped": "no merged expert"}
    owner = mass_owners(layer_plan, stats, options.absorb)
    step = max(1, block.inputs.shape[0] // options.max_tokens)
    k = len(layer_plan.groups)
    sigmoid = architecture.routing == "sigmoid"
    q = (score_targets if sigmoid else routing_targets)(block.scores[::step], owner, k)
    divergence = sigmoid_divergence if sigmoid else softmax_divergence
    weight = moe.router.weight
    bias = None if sigmoid else getattr(moe.router, "bias", None)
    x = block.inputs[::step].float()

    def kl(rows: torch.Tensor) -> float:
        return float(divergence(x.double() @ rows.double().T + (bias.double() if bias is not None else 0), q))

    before = kl(weight.data)
    fitted, evaluations = fit_rows(x, q, weight.data.float(), bias.data.float() if bias is not None else None, options,
                                   divergence)
    if not bool(torch.isfinite(fitted).all()):
        return {"kl_before": round(before, 6), "fallback": "non-finite values: the rows were kept as the plan made them"}
    weight.data.copy_(fitted.to(weight.dtype))
    report = {"kl_before": round(before, 6), "kl_after": round(kl(weight.data), 6), "tokens": int(x.shape[0]),
              "evaluations": evaluations}
    if sigmoid and options.choice_bias:
        top_k = route(moe, architecture, x[:1])[2].shape[1]
        report |= fit_choice_bias(moe, architecture, x, target_choice_share(stats, owner, k, top_k))
    if layer_plan.dropped and options.absorb:
        report["absorbed_by"] = {str(j): int(owner[j]) for j in layer_plan.dropped}
    return report
