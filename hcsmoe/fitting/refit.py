"""Stage 4, fit (the refit): fit the compressed layer's down projections to what the original layer did.

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

from dataclasses import asdict, dataclass
from functools import partial

import torch
from torch import nn

from hcsmoe.calibration.statistics import BlockTokens, Routed, expert_features, routed, token_spans
from hcsmoe.checkpoints.architectures import Architecture, MoELayer
from hcsmoe.errors import UserError
from hcsmoe.fitting.expert_fit import FIT_MEMORY
from hcsmoe.timing import timed
from hcsmoe.workers import parallel_map

SOLVERS = ("auto", "joint", "blockwise")
JOINT_LIMIT = 6144  # joint system up to this many unknowns per output column (float64 Gram of 300 MB)
# The blockwise solver keeps each expert's Cholesky factor across its sweeps while all K of them take at most
# this much (Qwen3-30B's 64 experts of 768: 300 MB) and at most half the fits' memory budget (--refit-memory);
# larger layers (Mixtral's experts of 14,336: 1.6 GB each) factor again every sweep. Either way the same bits.
FACTOR_CACHE_BYTES = 2**30


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
    anchor: float = 0.0  # the expert fit's ridge toward the closed-form weights, relative to its curvature (whitened)
    choose_fitted: bool = False  # the per-layer choice scores candidates after the expert fit too (each one fitted)
    memory: float = FIT_MEMORY / 2**30  # GiB the fits' working set may take: expert fit groups, the refit's factors

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise UserError(f"unknown refit solver {self.solver!r}; choose one of: {', '.join(SOLVERS)}")
        if self.alpha < 0 or self.sweeps < 1:
            raise UserError("the refit needs alpha >= 0 and at least one sweep")
        if self.steps < 0 or self.step_tokens < 0:
            raise UserError("the refit's steps and step tokens must be >= 0")
        if not self.memory > 0:
            raise UserError("--refit-memory must be a positive number of GiB (e.g. 0.5 on a machine with little memory)")
        if self.anchor < 0 or (self.anchor and not self.whiten):
            raise UserError("--refit-anchor must be >= 0 and needs whitened steps (drop --no-refit-whiten)")

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


@timed("refit")
@torch.no_grad()
def refit_layer(moe: MoELayer, architecture: Architecture, tokens: BlockTokens,
                options: RefitOptions = RefitOptions(), dtype: torch.dtype | None = None) -> dict:
    """Refit the down projections of a compressed MoE layer in place, rounded to `dtype` (the saved dtype;
    default down_proj's own); returns what the fit achieved (relative squared error of the routed output on
    the calibration tokens, before and after). A fit that gives non-finite values (a damaged target, a
    singular system) leaves the down projections as they were and says so in its report ("fallback")."""
    experts = moe.experts
    k, (width, _) = experts.down_proj.shape[0], readout_shape(experts, architecture)
    solver = options.solver
    if solver == "auto":
        solver = "joint" if k * width <= JOINT_LIMIT else "blockwise"
    routing = routed(moe, architecture, tokens.inputs)
    before = [tensor.detach().clone() for tensor in down_tensors(experts)]
    if solver == "joint":
        fitted, report = _joint(experts, architecture, tokens, routing, down_matrices(experts, architecture), options)
        set_down_matrices(experts, architecture, fitted, dtype)
    else:
        report = _blockwise(experts, architecture, tokens, routing, options, dtype, before)
    if not all(bool(torch.isfinite(tensor[expert]).all()) for tensor in down_tensors(experts) for expert in range(k)):
        for tensor, kept in zip(down_tensors(experts), before):
            tensor.data.copy_(kept)
        report = {"fallback": "non-finite values: the down projections were kept as the plan made them"}
    return {"solver": solver, "alpha": options.alpha, "tokens": int(tokens.inputs.shape[0])} | report


def down_tensors(experts: nn.Module) -> list[torch.Tensor]:
    """What the refit writes: the down projections and their bias (GPT-OSS)."""
    return [t for t in (experts.down_proj, getattr(experts, "down_proj_bias", None)) if t is not None]


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
        owned = [routing.tokens_of(expert, begin, stop) for expert in range(k)]
        features = parallel_map(partial(routed_features, experts, architecture, xt), enumerate(owned))
        for expert, ((token, _), own) in enumerate(zip(owned, features)):
            if own is not None:
                phi[token, expert] = own
                rows_of[expert] = token
        phi = phi.view(stop - begin, n)
        parallel_map(partial(add_block_row, gram, cross, phi, yt, width), rows_of.items())
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


def routed_features(experts, architecture: Architecture, xt: torch.Tensor,
                    owned: tuple[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
    """Expert e's features on its tokens of a chunk, `owned` = (e, (tokens, gates)); None if it has none."""
    expert, (token, gates) = owned
    return expert_features(experts, architecture, expert, xt[token], gates) if token.numel() else None


def add_block_row(gram: torch.Tensor, cross: torch.Tensor, phi: torch.Tensor, yt: torch.Tensor, width: int,
                  row: tuple[int, torch.Tensor]) -> None:
    """Add a chunk's part of block row `expert` of G (from its diagonal block on: G is symmetric) and of C,
    row = (expert, its tokens): rows no other expert writes, so the experts' rows can be added at once."""
    expert, token = row
    first = expert * width
    own = phi[token, first : first + width]
    gram[first : first + width, first:] += (own.T @ phi[token, first:]).double()
    cross[first : first + width] += (own.T @ yt[token]).double()


def _blockwise(experts, architecture, tokens: BlockTokens, routing: Routed, options: RefitOptions,
               dtype: torch.dtype | None, start_tensors: list[torch.Tensor]) -> dict:
    """Gauss-Seidel over experts: each readout is refitted on the residual the others leave, an I x I
    system per expert; converges to the joint solution (the system is symmetric positive definite).
    Solved in float64, one expert at a time; each update is written straight into down_proj rounded to
    `dtype` (what it is saved in) and the prediction follows the rounded value, so later updates make up for
    earlier rounding. The layer's extra memory is one copy of its starting readouts in down_proj's own dtype,
    `start_tensors` (down_tensors before the refit: the ridge's anchor, and refit_layer's fallback)."""
    k, (width, hidden) = experts.down_proj.shape[0], readout_shape(experts, architecture)
    anchor = (start_tensors[0], start_tensors[1] if len(start_tensors) > 1 else None)
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
    factors = FactorCache(k, width) if keeps_factors(k, width, options.memory) else None
    for _ in range(options.sweeps):
        for expert in range(k):
            token = per_expert[expert][0]
            if token.numel() == 0:
                continue
            phi = features(expert).double()
            current = down_matrix(experts, architecture, expert)
            residual = y[token].double() - prediction[token] + phi @ current
            factor = factors.get(expert) if factors is not None else None
            if factor is None:
                factor = _spd_factor(phi.T @ phi + ridge * eye)
                if factors is not None:  # the system is the same every sweep: factored once (same bits)
                    factor = factors.keep(expert, factor)
            updated = _solve_factored(factor, phi.T @ residual + ridge * start(expert))
            set_down_matrix(experts, architecture, expert, updated, dtype)
            prediction.index_add_(0, token, phi @ (down_matrix(experts, architecture, expert) - current))
    after = float((y.double() - prediction).pow(2).sum()) / max(energy, 1e-30)
    return {"error_before": round(before, 6), "error_after": round(after, 6), "sweeps": options.sweeps}


def keeps_factors(count: int, width: int, memory_gib: float) -> bool:
    """Whether the blockwise refit keeps its `count` factors across sweeps (a Gram matrix and a factorization
    saved per expert and sweep) rather than factor again: where they take at most FACTOR_CACHE_BYTES and half
    the fits' memory budget. The factors are the same either way, so is the refit."""
    return count * width * width * 8 <= min(FACTOR_CACHE_BYTES, memory_gib * 2**30 / 2)


class FactorCache:
    """The blockwise refit's K factors, in one block allocated up front: kept in small tensors of their own,
    they would lie between the sweep's short-lived ones on the heap, which could then not give that memory back
    (measured: 0.3 GB more resident on a Qwen3-30B-shaped layer)."""

    def __init__(self, count: int, width: int):
        self.matrices = torch.empty(count, width, width, dtype=torch.float64)
        self.cholesky: list[bool | None] = [None] * count

    def get(self, expert: int) -> tuple[torch.Tensor, bool] | None:
        kind = self.cholesky[expert]
        return None if kind is None else (self.matrices[expert], kind)

    def keep(self, expert: int, factor: tuple[torch.Tensor, bool]) -> tuple[torch.Tensor, bool]:
        self.matrices[expert].copy_(factor[0])
        self.cholesky[expert] = factor[1]
        return self.get(expert)


def _spd_factor(system: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A symmetric positive definite system's Cholesky factor (half the work of LU), or the system itself
    (False) where it is not positive definite."""
    factor, info = torch.linalg.cholesky_ex(system)
    return (factor, True) if int(info) == 0 else (system, False)


def _solve_factored(factor: tuple[torch.Tensor, bool], rhs: torch.Tensor) -> torch.Tensor:
    """Solve with _spd_factor's result: by the Cholesky factor, or by LU where there is none."""
    matrix, cholesky = factor
    return torch.cholesky_solve(rhs, matrix) if cholesky else torch.linalg.solve(matrix, rhs)


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


