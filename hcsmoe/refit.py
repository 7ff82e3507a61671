"""Stage 4: fit the compressed layer's down projections to what the original layer did.

After a plan is applied (experts merged or dropped, K router rows), each kept or merged expert g still
computes h_g(x) = act(W_gate,g x) * (W_up,g x), and the compressed block outputs sum_g g'_g(x) D_g h_g(x)
over the K-row router's top-k. With the gates and the gate/up weights fixed this is linear in the down
projections D = [D_1 .. D_K], so the D that makes the compressed block reproduce the original block's
routed output y(x) on calibration tokens is a ridge least-squares problem:

    min_D  sum_x || y(x) - sum_g g'_g(x) D_g h_g(x) ||^2  +  lambda || D - D_0 ||^2

pulled toward D_0, the plan's own down projections (lambda = alpha x the mean diagonal of the Gram
matrix). This generalises MergeMoE's least-squares step: one fit for the whole layer against the
original layer's output, with the compressed router's real gates, so it also absorbs what dropped
experts did and the changed top-k renormalisation. A merged expert is then no longer a static blend
of its members: its readout is fitted to what the members produced on the tokens it now serves.

Two solvers give the same minimiser: "joint" accumulates the (K*I)^2 Gram matrix and solves it once
(exact; used while K*I is small enough); "blockwise" runs Gauss-Seidel sweeps over experts, each an
I x I system on the current residual, so memory stays O(I^2 + tokens*H) beyond the readouts themselves.
Families with a down-projection bias (GPT-OSS) fit it as one more input column.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from hcsmoe.adapters import Architecture, MoELayer
from hcsmoe.calibrate import BlockTokens, LayerStats, Routed, expert_features, routed, token_spans
from hcsmoe.distributed import SINGLE, World
from hcsmoe.errors import UserError
from hcsmoe.expert_fit import fit_experts
from hcsmoe.plan import LayerPlan
from hcsmoe.router_fit import RouterFitOptions, fit_router

SOLVERS = ("auto", "joint", "blockwise")
JOINT_LIMIT = 6144  # joint system up to this many unknowns per output column (float64 Gram of 300 MB)


@dataclass(frozen=True)
class RefitOptions:
    """How the down projections are refitted; `alpha=0` is plain least squares."""

    alpha: float = 0.01  # ridge strength relative to the mean diagonal of the Gram matrix
    solver: str = "auto"  # "joint", "blockwise", or "auto" (joint while K * I <= JOINT_LIMIT)
    sweeps: int = 4  # Gauss-Seidel sweeps of the blockwise solver
    token_chunk: int = 2048
    steps: int = 0  # then L-BFGS iterations fitting gate/up and down together (expert_fit); 0: down only
    step_tokens: int = 0  # calibration tokens those iterations use, evenly spaced (0: all)
    whiten: bool = True  # those iterations in whitened coordinates (expert_fit.py): same fit in about 3x fewer steps

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise UserError(f"unknown refit solver {self.solver!r}; choose one of: {', '.join(SOLVERS)}")
        if self.alpha < 0 or self.sweeps < 1:
            raise UserError("the refit needs alpha >= 0 and at least one sweep")
        if self.steps < 0 or self.step_tokens < 0:
            raise UserError("the refit's steps and step tokens must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


def down_matrix(experts: nn.Module, architecture: Architecture, expert: int,
                anchor: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> torch.Tensor:
    """One expert's readout as [I (+1 for a bias row), H] float64 (output = feature @ matrix); `anchor`:
    read from that (down_proj, bias) copy instead of the module."""
    down, bias = anchor or (experts.down_proj, getattr(experts, "down_proj_bias", None))
    matrix = down[expert].double() if architecture.transposed else down[expert].double().T
    return matrix if bias is None else torch.cat([matrix, bias[expert].double().unsqueeze(0)])


def readout_shape(experts: nn.Module, architecture: Architecture) -> tuple[int, int]:
    """(I (+1 for a bias row), H): the shape of one expert's readout, from down_proj's shape."""
    _, first, second = experts.down_proj.shape
    width, hidden = (first, second) if architecture.transposed else (second, first)
    return width + (getattr(experts, "down_proj_bias", None) is not None), hidden


def down_matrices(experts: nn.Module, architecture: Architecture) -> torch.Tensor:
    """Every expert's readout, [K, I (+1), H] float64: for the joint solver, whose K x I is bounded."""
    return torch.stack([down_matrix(experts, architecture, e) for e in range(experts.down_proj.shape[0])])


def set_down_matrices(experts: nn.Module, architecture: Architecture, matrices: torch.Tensor,
                      dtype: torch.dtype | None = None) -> None:
    """Write fitted readouts back into down_proj (and its bias), one expert at a time."""
    for expert in range(matrices.shape[0]):
        set_down_matrix(experts, architecture, expert, matrices[expert], dtype)


def set_down_matrix(experts: nn.Module, architecture: Architecture, expert: int, matrix: torch.Tensor,
                    dtype: torch.dtype | None = None) -> None:
    """Write one expert's readout into down_proj (and its bias), rounded float64 -> float32 -> `dtype` (the
    saved dtype; default the parameter's own) as the in-memory model is rounded when saved."""
    matrix = matrix.float()
    bias = getattr(experts, "down_proj_bias", None)
    if bias is not None:
        bias.data[expert].copy_(matrix[-1].to(dtype or bias.dtype))
        matrix = matrix[:-1]
    weight = matrix if architecture.transposed else matrix.T
    experts.down_proj.data[expert].copy_(weight.to(dtype or experts.down_proj.dtype))


@torch.no_grad()
def refit_layer(moe: MoELayer, architecture: Architecture, tokens: BlockTokens,
                options: RefitOptions = RefitOptions(), dtype: torch.dtype | None = None) -> dict:
    """Refit the down projections of a compressed MoE layer in place, rounded to `dtype` (the saved dtype;
    default down_proj's own); returns what the fit achieved (relative squared error of the routed output on
    the calibration tokens, before and after)."""
    experts = moe.experts
    k, (width, _) = experts.down_proj.shape[0], readout_shape(experts, architecture)
    solver = options.solver
    if solver == "auto":
        solver = "joint" if k * width <= JOINT_LIMIT else "blockwise"
    routing = routed(moe, architecture, tokens.inputs)
    if solver == "joint":
        fitted, report = _joint(experts, architecture, tokens, routing, down_matrices(experts, architecture), options)
        set_down_matrices(experts, architecture, fitted, dtype)
    else:
        report = _blockwise(experts, architecture, tokens, routing, options, dtype)
    return {"solver": solver, "alpha": options.alpha, "tokens": int(tokens.inputs.shape[0])} | report


def _ridge(gram_trace: float, unknowns: int, alpha: float) -> float:
    return alpha * gram_trace / max(unknowns, 1)


def _joint(experts, architecture, tokens: BlockTokens, routing: Routed, start: torch.Tensor,
           options: RefitOptions) -> tuple[torch.Tensor, dict]:
    """One system over all K readouts: accumulate G = sum phi phi^T and C = sum phi y^T, then solve."""
    k, width, hidden = start.shape
    n = k * width
    gram = torch.zeros(n, n, dtype=torch.float64)
    cross = torch.zeros(n, hidden, dtype=torch.float64)
    target_energy = 0.0
    x, y = tokens.inputs, tokens.routed
    for begin, stop in token_spans(x.shape[0], options.token_chunk):
        xt, yt = x[begin:stop].float(), y[begin:stop].float()
        target_energy += float(yt.double().pow(2).sum())
        phi = torch.zeros(stop - begin, k, width)
        rows_of = {}
        for expert in range(k):
            token, gates = routing.tokens_of(expert, begin, stop)
            if token.numel():
                phi[token, expert] = expert_features(experts, architecture, expert, xt[token], gates)
                rows_of[expert] = token
        phi = phi.view(stop - begin, n)
        for expert, token in rows_of.items():  # block row `expert`, from its diagonal block on (G is symmetric)
            first = expert * width
            own = phi[token, first : first + width]
            gram[first : first + width, first:] += (own.T @ phi[token, first:]).double()
            cross[first : first + width] += (own.T @ yt[token]).double()
    diagonal = torch.block_diag(*(gram[a * width : (a + 1) * width, a * width : (a + 1) * width] for a in range(k)))
    gram = gram + gram.T - diagonal
    w0 = start.reshape(n, hidden)
    ridge = _ridge(float(gram.diagonal().sum()), n, options.alpha)
    system = gram + ridge * torch.eye(n, dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:  # only with alpha = 0 and experts the router never picks
        solution = torch.linalg.lstsq(system, cross + ridge * w0).solution
    else:
        solution = torch.cholesky_solve(cross + ridge * w0, factor)

    def error(w: torch.Tensor) -> float:
        return (target_energy - 2 * float((w * cross).sum()) + float((w * (gram @ w)).sum())) / max(target_energy, 1e-30)

    return solution.view(k, width, hidden), {"error_before": round(error(w0), 6), "error_after": round(error(solution), 6)}


def _blockwise(experts, architecture, tokens: BlockTokens, routing: Routed, options: RefitOptions,
               dtype: torch.dtype | None) -> dict:
    """Gauss-Seidel over experts: each readout is refitted on the residual the others leave, an I x I
    system per expert; converges to the joint solution (the system is symmetric positive definite).
    Solved in float64, one expert at a time; each update is written straight into down_proj rounded to
    `dtype` (what it is saved in) and the prediction follows the rounded value, so later updates make up for
    earlier rounding. The layer's extra memory is one copy of its starting readouts (the ridge's anchor) in
    down_proj's own dtype."""
    k, (width, hidden) = experts.down_proj.shape[0], readout_shape(experts, architecture)
    bias = getattr(experts, "down_proj_bias", None)
    anchor = (experts.down_proj.detach().clone(), None if bias is None else bias.detach().clone())
    start = lambda expert: down_matrix(experts, architecture, expert, anchor)
    x, y = tokens.inputs, tokens.routed
    per_expert = [routing.tokens_of(expert) for expert in range(k)]
    features = lambda expert: expert_features(experts, architecture, expert, x[per_expert[expert][0]].float(),
                                              per_expert[expert][1])
    prediction = torch.zeros(x.shape[0], hidden, dtype=torch.float64)
    trace = 0.0
    for expert in range(k):
        phi = features(expert).double()
        trace += float(phi.pow(2).sum())
        prediction.index_add_(0, per_expert[expert][0], phi @ start(expert))
    energy = float(y.double().pow(2).sum())
    before = float((y.double() - prediction).pow(2).sum()) / max(energy, 1e-30)
    ridge = _ridge(trace, k * width, options.alpha)
    eye = torch.eye(width, dtype=torch.float64)
    for _ in range(options.sweeps):
        for expert in range(k):
            token = per_expert[expert][0]
            if token.numel() == 0:
                continue
            phi = features(expert).double()  # its Gram is recomputed, not stored: O(I^2) memory, not O(K I^2)
            current = down_matrix(experts, architecture, expert)
            residual = y[token].double() - prediction[token] + phi @ current
            updated = _solve_spd(phi.T @ phi + ridge * eye, phi.T @ residual + ridge * start(expert))
            set_down_matrix(experts, architecture, expert, updated, dtype)
            prediction.index_add_(0, token, phi @ (down_matrix(experts, architecture, expert) - current))
    after = float((y.double() - prediction).pow(2).sum()) / max(energy, 1e-30)
    return {"error_before": round(before, 6), "error_after": round(after, 6), "sweeps": options.sweeps}


def _solve_spd(system: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve a symmetric positive definite system by Cholesky (half the work of LU); LU if it is not."""
    factor, info = torch.linalg.cholesky_ex(system)
    return torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(system, rhs)


def routed_output(moe: MoELayer, architecture: Architecture, x: torch.Tensor) -> torch.Tensor:
    """The compressed block's routed output on tokens x [T, H] (float64): features times readouts."""
    routing = routed(moe, architecture, x)
    out = torch.zeros(x.shape[0], readout_shape(moe.experts, architecture)[1], dtype=torch.float64)
    for expert in range(moe.experts.down_proj.shape[0]):
        token, gates = routing.tokens_of(expert)
        if token.numel():
            phi = expert_features(moe.experts, architecture, expert, x[token].float(), gates).double()
            out.index_add_(0, token, phi @ down_matrix(moe.experts, architecture, expert))
    return out


def split_tokens(block: BlockTokens, held_out: float = 1 / 8) -> tuple[BlockTokens, BlockTokens]:
    """(fitting part, held-out part): the last `held_out` of the tokens (the last calibration blocks) held out."""
    cut = block.inputs.shape[0] - max(1, int(block.inputs.shape[0] * held_out))
    part = lambda piece: BlockTokens(*(None if t is None else t[piece] for t in
                                       (block.inputs, block.routed, block.scores, block.rest)))
    return part(slice(0, cut)), part(slice(cut, None))


def fitting_tokens(layer_plan: LayerPlan, block: BlockTokens | None) -> BlockTokens | None:
    """The tokens a layer plan's fits use: a plan made by the per-layer choice was fitted on its fitting part,
    so re-applying it fits on the same tokens and gives the same weights."""
    if block is not None and "choice" in layer_plan.details:
        return split_tokens(block)[0]
    return block


@torch.no_grad()
def choose_layer_plan(candidates: list, compressed, architecture: Architecture, stats: LayerStats,
                      block: BlockTokens, output_dtype: torch.dtype, refit: RefitOptions | None,
                      router_fit: RouterFitOptions | None, keep_winner: bool = True, world: World = SINGLE):
    """Per-layer choice between plans: each candidate (plan, layer plan) is applied to a fresh copy of the layer
    (`compressed(plan, layer_plan)`), fitted on 7/8 of the calibration tokens and scored by the relative
    error of its routed output on the other 1/8. Returns the winner's plan, its layer plan (recording every
    candidate's error and its fits) and its fitted copy of the layer, which is the result. The candidates are
    scored after the closed-form fits; only the winner then gets the expert fit (refit.steps), the costly
    part. The winner is not refitted on all tokens: that would gain little (7/8 of them already) and cost a third of the layer's time. `keep_winner=False`
    holds one compressed copy at a time (streaming, where a layer's memory counts): the candidates are fitted
    last to first, and the first one's copy (the recipe's merge, which wins most layers) is returned if it
    wins, else None: rebuilding and refitting the winner on fitting_tokens() gives the same bits.
    `world` (torchrun): every rank builds every candidate, rank r fits and scores candidates r, r + N, ...; the
    scores are exchanged and the winner's fitted weights copied from the rank that fitted it."""
    fitting, held = split_tokens(block)
    energy = float(held.routed.double().pow(2).sum())
    fitter = lambda position: position % world.size  # the rank that fits and scores a candidate
    trials = {}
    for position in reversed(range(len(candidates))):
        plan, layer_plan = candidates[position]
        trial = copy.deepcopy(layer_plan)
        moe = compressed(plan, trial)
        error = None
        if fitter(position) == world.rank:
            fit_compressed_layer(moe, architecture, trial, stats, fitting, output_dtype, refit, router_fit,
                                 with_experts=False)
            residual = held.routed.double() - routed_output(moe, architecture, held.inputs)
            error = float(residual.pow(2).sum()) / max(energy, 1e-30)
        kept = moe if keep_winner or position == 0 else None
        trials[position] = (error, trial, kept)
        del moe, kept
    scored = {p: t[:2] for rank in world.gather({p: t[:2] for p, t in trials.items() if t[0] is not None})
              for p, t in rank.items()}
    trials = [(*scored[position], trials[position][2]) for position in range(len(candidates))]
    best = min(range(len(candidates)), key=lambda i: (trials[i][0], i))
    _, chosen, moe = trials[best]
    if moe is not None:
        if fitter(best) == world.rank:
            fit_layer_experts(moe, architecture, chosen, fitting, output_dtype, refit)
        if world.size > 1:
            world.copy_from(fitter(best), fitted_tensors(moe))
            if refit is not None and refit.steps:  # the expert fit's report, from the rank that ran it
                chosen.details["refit"] = world.gather(chosen.details.get("refit"))[fitter(best)]
    chosen.details["choice"] = {"held_out_error": {c[0].method: round(t[0], 6) for c, t in zip(candidates, trials)},
                                "chosen": candidates[best][0].method}
    return candidates[best][0], chosen, moe


def fitted_tensors(moe: MoELayer) -> list[torch.Tensor]:
    """Every tensor the fitting stages may change: the compressed layer's experts and router."""
    return [tensor for module in (moe.experts, moe.router)
            for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]]


def round_layer(moe: MoELayer, dtype: torch.dtype) -> None:
    """Round the compressed layer's expert and router weights to the dtype they will be saved in, so the
    fit sees the weights the saved model will run (the values stay float32, exactly representable)."""
    for module in (moe.experts, moe.router):
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if tensor.is_floating_point():
                tensor.data.copy_(tensor.data.to(dtype).to(tensor.dtype))


def fit_compressed_layer(moe: MoELayer, architecture: Architecture, layer_plan: LayerPlan, stats: LayerStats,
                         block: BlockTokens | None, output_dtype: torch.dtype, refit: RefitOptions | None,
                         router_fit: RouterFitOptions | None, with_experts: bool = True) -> None:
    """The fitting stage of one compressed layer: fit its router to the original routing mass, round it to
    the saved dtype, refit its down projections to the original layer's routed output (with the final
    router), then (refit.steps, unless `with_experts` is False) gate/up and down together, and record each
    fit in the layer's plan. The layer then holds exactly the values that will be saved (what sequential
    calibration runs next). A plan that keeps every expert unmerged is only rounded, so K = E still
    reproduces the model bit for bit."""
    identity = layer_plan.dropped == [] and all(len(g.members) == 1 for g in layer_plan.groups)
    with torch.no_grad():
        if router_fit is not None and not identity:
            layer_plan.details["router_fit"] = fit_router(moe, architecture, layer_plan, stats, block, router_fit)
        round_layer(moe, output_dtype)
        if refit is not None and not identity:
            layer_plan.details["refit"] = refit_layer(moe, architecture, block, refit, output_dtype)
            round_layer(moe, output_dtype)
            if with_experts:
                fit_layer_experts(moe, architecture, layer_plan, block, output_dtype, refit)


def fit_layer_experts(moe: MoELayer, architecture: Architecture, layer_plan: LayerPlan, block: BlockTokens,
                      output_dtype: torch.dtype, refit: RefitOptions | None) -> None:
    """The expert fit (expert_fit.py) of a refitted layer, when refit.steps asks for one; rounded to the saved dtype."""
    if refit is not None and refit.steps and "refit" in layer_plan.details:
        layer_plan.details["refit"]["experts"] = fit_experts(
            moe, architecture, block, refit.steps, refit.step_tokens, refit.whiten)
        round_layer(moe, output_dtype)
