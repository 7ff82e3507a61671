"""Stage 4, fit (the expert fit, after the refit): fit the compressed layer's experts, gate/up and down
projections together, to the original layer.

The refit (refit.py) makes the down projections the least-squares best readout of features it cannot
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

The hidden states an expert reads are far from isotropic, which makes plain gradient steps slow. By default
(`whiten`) each expert's weights are fitted in whitened coordinates: W = W0 + D P, the change D the fitted
leaf, P (C + r I) P^T = I for the covariance C of what the weight reads (gate/up: the expert's own hidden
states; down: its gated intermediate activations at the start), r a fraction WHITENING_RIDGE of C's mean
eigenvalue (P = L^-1, L the Cholesky factor of C + r I); the whitenings are then balanced so that gate/up and down move at rates that do not depend on
the model's scale (balance_whitenings). The function fitted is the same; only the steps change: 30 whitened
steps fit about as well as 100 plain ones on the bundled models (measured in the README). `anchor`
(--refit-anchor, off by default) adds a ridge on the whitened changes D, which keeps the fit nearer the
closed-form weights along the directions the calibration text exercises least (docs/choosing-the-default.md,
"Text unlike the calibration").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hcsmoe.calibration.statistics import BlockTokens, expert_features, expert_slices, expert_view, routed, token_spans
from hcsmoe.checkpoints.architectures import (
    Architecture,
    MoELayer,
    expert_intermediate,
    expert_output_from_intermediate,
)
from hcsmoe.heap import trim_heap
from hcsmoe.timing import timed
from hcsmoe.workers import parallel_map

FITTED = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
WHITENING_RIDGE = 0.1  # bounds the amplification of rare input directions at 1/sqrt(0.1) ~ 3.2 times the mean one's
PROBES = 4  # random output directions estimating each whitened weight's Gauss-Newton scale
# The down projections' Gauss-Newton scale relative to gate/up's once balanced: a faster down projection keeps
# near its least-squares optimum as gate/up moves. Chosen on held-out train text of both bundled models (equal
# rates gained about half as much over plain steps in probe runs; figures in issue 10's notes).
DOWN_CURVATURE = 16.0
HISTORY = 20  # L-BFGS correction pairs kept: each pair is 2 float32 copies of the fitted weights
# The fit's working set, in float32 copies of the weights fitted together, besides those pairs: leaves, gradients,
# the weights they stand for, L-BFGS's search vectors (measured: 23.0 GB peak fitting one Qwen3-30B-shaped layer,
# 1.21 GB of weights, with 3 pairs).
OVERHEAD_COPIES = 13
# Where fitting a whole layer at once would take more than the fit's memory budget (RefitOptions.memory,
# --refit-memory; FIT_MEMORY by default: Qwen3-30B's layer at 64 experts would take 64 GB), the experts are fitted
# in groups that each stay under it, with SHORT_HISTORY pairs, each group with the others held as they are; the
# groups keep together the experts whose tokens overlap most (coupled_groups). Forced on the bundled models (30
# whitened steps, share of the whole-layer fit's held-out train gain; benchmarks/grouped_fit.py): 4 groups keep
# 79% on the reference at 24 experts and 81% on the Qwen2-MoE at 45 (70% and 55% as consecutive experts),
# groups of one expert 57% and 31%. Sweeping over the groups again, the steps shared out, lost (46% for three sweeps
# over single experts on the reference).
FIT_MEMORY = 8 * 2**30
SHORT_HISTORY = 5
CHUNK_TOKENS = 2048  # tokens per forward/backward pass: memory ~ CHUNK_TOKENS x top-k x (2H + 6I) x 4 bytes


def evenly_spaced(total: int, count: int) -> torch.Tensor:
    """`count` token positions spread over all `total` (all of them when count covers the total)."""
    if count <= 0 or count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


def fit_schedule(count: int, per_expert: int, memory: int = FIT_MEMORY) -> tuple[list[range], int]:
    """How many experts are fitted together, and with how many L-BFGS pairs: all `count` with HISTORY pairs where
    that working set fits `memory` bytes; else SHORT_HISTORY pairs, in as few groups as keep each group's under
    it (`per_expert`: an expert's fitted weights), given as consecutive ranges whose sizes coupled_groups then
    fills. It depends on the layer's shape and the budget only, never on the machine, so the same model gives
    the same weights anywhere."""
    def working_set(experts: int, history: int) -> int:
        return 4 * per_expert * experts * (2 * history + OVERHEAD_COPIES)

    if working_set(count, HISTORY) <= memory:
        return [range(count)], HISTORY
    groups = math.ceil(count / max(1, memory // working_set(1, SHORT_HISTORY)))
    bounds = [round(i * count / groups) for i in range(groups + 1)]
    return [range(first, stop) for first, stop in zip(bounds, bounds[1:])], SHORT_HISTORY


def per_expert_tokens(moe: MoELayer, architecture: Architecture, inputs: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(positions, gate weights) of each expert's tokens under the compressed router, expert by expert."""
    routing = routed(moe, architecture, inputs)
    return [routing.tokens_of(expert) for expert in range(moe.experts.down_proj.shape[0])]


def expert_output(experts: nn.Module, architecture: Architecture, own: dict[str, torch.Tensor], x: torch.Tensor,
                  gates: torch.Tensor) -> torch.Tensor:
    """One expert's routed output [t, H] on its tokens x [t, H], with its tensors `own` (each [1, ...]), scaled
    by their gates (differentiable)."""
    view, x = expert_view(experts, own), x.unsqueeze(0)
    if architecture.gate_on_input:
        h = expert_intermediate(view, architecture, x * gates.view(1, -1, 1))
        return expert_output_from_intermediate(view, architecture, h)[0]
    h = expert_intermediate(view, architecture, x)
    return expert_output_from_intermediate(view, architecture, h)[0] * gates.unsqueeze(-1)


def expert_outputs(experts: nn.Module, architecture: Architecture, tensors_of: Callable[[int], dict[str, torch.Tensor]],
                   reads: list[torch.Tensor], tokens: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each expert's routed output on exactly its own tokens (`reads[e]`, their hidden states), with the tensors
    `tensors_of(e)` gives (made on the worker, so only the experts running hold them), the experts spread over
    the workers. Running each expert on its tokens, rather than all experts in one batched product padded to the
    busiest one, does 2-3 times less arithmetic on routers as uneven as the bundled models' (the busiest expert
    takes 2-2.7 times the mean)."""
    return parallel_map(lambda e: expert_output(experts, architecture, tensors_of(e), reads[e], tokens[e][1]),
                        range(len(reads)))


def gathered(inputs: torch.Tensor, tokens: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Each expert's tokens' hidden states, gathered once (a fit reads them at every evaluation)."""
    return parallel_map(lambda own: inputs[own[0]], tokens)


def summed(outputs: list[torch.Tensor], tokens: list[tuple[torch.Tensor, torch.Tensor]], count: int) -> torch.Tensor:
    """The experts' outputs summed back per token [count, H], in ascending expert order."""
    positions = torch.cat([p for p, _ in tokens])
    return torch.zeros(count, outputs[0].shape[-1], device=outputs[0].device).index_add(0, positions, torch.cat(outputs))


def backward_each(outputs: list[torch.Tensor], upstream: torch.Tensor, tokens: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Take the gradient `upstream` [T, H] of the summed output back through each expert's own graph, on the
    workers (each expert's leaves are its own, so no two workers add into one gradient)."""
    parallel_map(lambda e: outputs[e].backward(upstream[tokens[e][0]]), range(len(outputs)))


def one_expert(experts: nn.Module, expert: int, fitted: list[str], whitened: dict[str, torch.Tensor] | None = None,
               ) -> dict[str, torch.Tensor]:
    """Expert `expert`'s tensors ([1, ...] slices), those in `fitted` as float32 leaves of their own: each
    expert's gradient is then its own tensor, not a slice's scattered into a copy of the whole layer. A
    weight fitted in whitened coordinates is a leaf holding its change in them, zero at the start."""
    own = expert_slices(experts, expert)
    whitened = whitened or {}
    return own | {name: (torch.zeros_like(own[name], dtype=torch.float32) if name in whitened
                         else own[name].detach().float().clone()).requires_grad_(True) for name in fitted}


def whitening(gram: torch.Tensor, count: int) -> torch.Tensor:
    """A whitening P of the covariance C = gram / count with a ridge r = WHITENING_RIDGE times C's mean
    eigenvalue: P (C + r I) P^T = I, P = L^-1 for the Cholesky factor L of C + r I (float64); the identity for
    an expert that saw no signal (nothing to rescale). Every such P gives the same L-BFGS iterates (two differ
    by a rotation of the fitted coordinates, to which L-BFGS is blind), and a Cholesky factor costs a small
    part of an eigendecomposition's arithmetic (n^3/3 against about 9 n^3)."""
    covariance = gram.double() / max(count, 1)
    mean = float(covariance.diagonal().sum()) / covariance.shape[0]
    eye = torch.eye(covariance.shape[0], dtype=torch.float64, device=gram.device)
    if mean <= 0:
        return eye.float()
    factor = torch.linalg.cholesky(covariance + WHITENING_RIDGE * mean * eye)
    return torch.linalg.solve_triangular(factor, eye, upper=False).float()


@torch.no_grad()
def expert_whitenings(experts: nn.Module, architecture: Architecture, inputs: torch.Tensor,
                      chunks: list, members: range | None = None) -> list[dict[str, torch.Tensor]]:
    """Per expert (of `members`, default all), the whitening of what gate/up reads (its tokens' hidden states,
    gated first where the gate scales the input) and of what down reads (the gated intermediate activations
    at the start)."""
    width = experts.down_proj.shape[1 if architecture.transposed else 2]  # I: no bias column

    def of(expert: int) -> dict[str, torch.Tensor]:
        reads, activations = [], []
        for begin, stop, routing in chunks:
            positions, gates = routing[expert]
            x = inputs[begin:stop][positions]
            reads.append(x * gates.unsqueeze(-1) if architecture.gate_on_input else x)
            activations.append(expert_features(experts, architecture, expert, x, gates)[:, :width])
        x, h = torch.cat(reads), torch.cat(activations)
        return {"gate_up_proj": whitening(x.T @ x, len(x)), "down_proj": whitening(h.T @ h, len(h))}

    return parallel_map(of, members or range(experts.down_proj.shape[0]))


def balanced_curvature(name: str) -> float:
    """The mean Gauss-Newton diagonal balance_whitenings gives a weight of this kind, in whitened coordinates."""
    return DOWN_CURVATURE if name == "down_proj" else 1.0


def balance_whitenings(whitenings: list[dict[str, torch.Tensor]], tensors: list[dict[str, torch.Tensor]],
                       gradients) -> None:
    """Rescale the whitenings so that, in whitened coordinates, the layer's gate/up weights have a mean
    Gauss-Newton diagonal of 1 and its down projections DOWN_CURVATURE. Whitening makes each weight's
    inputs isotropic, not the output's sensitivity to it: gate/up acts through the down projection, whose
    scale is the model's own (on the bundled models the unbalanced down projections' scale is 6 to 28 times
    gate/up's, expert by expert), and L-BFGS starts from one scalar curvature for all. The scale is estimated
    from PROBES random output directions v (E ||J^T v||^2 = trace(J^T J)); `gradients(generator)` backpropagates one."""
    generator, totals = torch.Generator().manual_seed(0), dict.fromkeys(whitenings[0], 0.0)
    for _ in range(PROBES):
        gradients(generator)
        for own in tensors:
            for name in totals:
                totals[name] += float(own[name].grad.double().pow(2).sum())
            for leaf in own.values():
                leaf.grad = None
    for name, total in totals.items():
        scale = total / PROBES / sum(own[name].numel() for own in tensors)
        target = balanced_curvature(name)
        if scale > 0:
            for whitened in whitenings:
                whitened[name] = whitened[name] * (target / scale) ** 0.5


def expert_weights(experts: nn.Module, expert: int, own: dict[str, torch.Tensor],
                   whitened: dict[str, torch.Tensor] | None, transposed: bool) -> dict[str, torch.Tensor]:
    """The expert's tensors the leaves `own` stand for: a whitened weight is its start W plus the change D
    taken back through the whitening P, on the input side of the matrix (W + D P for [1, out, in] storage,
    W + P^T D for transposed [1, in, out]); a zero change gives W exactly."""
    if not whitened:
        return own
    start = expert_slices(experts, expert)
    return own | {name: start[name].float() + (torch.matmul(p.T, own[name]) if transposed else torch.matmul(own[name], p))
                  for name, p in whitened.items()}


def leaf_gradient(gradient: torch.Tensor, p: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The gradient of a whitened leaf D from its weight's, W = W + D P (or W + P^T D): dD = dW P^T (or P dW)."""
    return torch.matmul(p, gradient) if transposed else torch.matmul(gradient, p.T)


def anchor_penalty(tensors: list[dict[str, torch.Tensor]], whitenings: list[dict[str, torch.Tensor] | None],
                   strength: float) -> torch.Tensor:
    """The fit's ridge toward where it starts (the closed-form fits' weights): strength x sum of c ||D||^2 over
    the whitened changes D, c the balanced curvature of their kind (balanced_curvature): relative to the error's
    own Gauss-Newton diagonal, so --refit-anchor 1 damps a direction whose curvature is the layer's mean by half
    and rarer ones (what only the calibration text exercises) more. Adds its gradient to the leaves'; 0 when
    strength is 0 or nothing is whitened."""
    total = torch.zeros((), dtype=torch.float64)
    if strength <= 0:
        return total
    for own, whitened in zip(tensors, whitenings):
        for name in whitened or {}:
            weight = strength * balanced_curvature(name)
            leaf = own[name]
            total += weight * float(leaf.detach().double().pow(2).sum())
            leaf.grad = leaf.grad + 2 * weight * leaf.detach() if leaf.grad is not None else 2 * weight * leaf.detach()
    return total


@timed("expert fit")
def fit_experts(moe: MoELayer, architecture: Architecture, tokens: BlockTokens, steps: int,
                sample: int, whiten: bool = True, anchor: float = 0.0, memory: int = FIT_MEMORY) -> dict:
    """Fit the layer's expert tensors in place (float32) by `steps` L-BFGS iterations on `sample` evenly
    spaced calibration tokens (in whitened coordinates if `whiten`, with an `anchor` ridge toward the start:
    anchor_penalty); returns the relative squared error of the routed output before and after. Gradients are
    accumulated over chunks of CHUNK_TOKENS tokens, and a large layer's experts are fitted a group at a time
    (fit_schedule, fit_in_groups), so the working set stays under `memory` bytes where one expert fits in it."""
    experts = moe.experts
    chosen = evenly_spaced(tokens.inputs.shape[0], sample)
    device = experts.down_proj.device
    inputs, target = (t[chosen.to(t.device)].detach().float().to(device) for t in (tokens.inputs, tokens.routed))
    chunks = [(begin, stop, per_expert_tokens(moe, architecture, inputs[begin:stop]))
              for begin, stop in token_spans(len(chosen), CHUNK_TOKENS)]
    fitted = [name for name in FITTED if getattr(experts, name, None) is not None]
    groups, history = fit_schedule(experts.down_proj.shape[0], sum(getattr(experts, name)[0].numel() for name in fitted),
                                   memory)
    energy = max(float(target.double().pow(2).sum()), 1e-30)
    if len(groups) == 1:
        before, after, evaluations = fit_group(experts, architecture, inputs, target, chunks, energy, fitted, groups[0],
                                               steps, history, whiten, anchor)
    else:
        groups = coupled_groups(chunks, experts.down_proj.shape[0], [len(group) for group in groups])
        before, after, evaluations = fit_in_groups(experts, architecture, inputs, target, chunks, energy, fitted,
                                                   groups, steps, history, whiten, anchor)
    report = {"steps": steps, "tokens": int(chosen.numel()), "whitened": whiten, "anchor": anchor, "history": history,
              "groups": len(groups), "error_before": round(before, 6), "error_after": round(after, 6),
              "evaluations": evaluations}
    if not (math.isfinite(before) and math.isfinite(after)):
        report["fallback"] = "non-finite values: the experts were kept as the refit left them"
    return report


@torch.no_grad()
def coupled_groups(chunks: list, count: int, sizes: list[int]) -> list[list[int]]:
    """Groups of the given sizes that keep together the experts whose tokens overlap most: the coupling of two
    experts is the sum over tokens of their gates' product (what ties their outputs in the layer's error).
    Each group starts from the free expert most coupled to the other free ones and grows by the free expert
    most coupled to the group; ties go to the lower index."""
    coupling = torch.zeros(count, count, dtype=torch.float64)
    for begin, stop, routing in chunks:
        gates = torch.zeros(stop - begin, count, dtype=torch.float64)
        for expert, (positions, weights) in enumerate(routing):
            gates[positions, expert] = weights.double()
        coupling += gates.T @ gates
    coupling.fill_diagonal_(0)
    free, groups = list(range(count)), []
    for size in sizes:
        group = [max(free, key=lambda e: (float(coupling[e, free].sum()), -e))]
        free.remove(group[0])
        while len(group) < size:
            group.append(max(free, key=lambda e: (float(coupling[e, group].sum()), -e)))
            free.remove(group[-1])
        groups.append(sorted(group))
    return groups


@torch.no_grad()
def current_output(experts: nn.Module, architecture: Architecture, inputs: torch.Tensor, chunks: list,
                   members: range | list[int]) -> torch.Tensor:
    """The routed output [T, H] of the experts `members` as the layer holds them now, chunk by chunk; each
    expert is taken to float32 only while it runs (a whole layer in float32 is more than the fit's budget)."""
    in_float32 = lambda i: {n: t.float() for n, t in expert_slices(experts, members[i]).items()}

    def output(begin: int, stop: int, routing: list) -> torch.Tensor:
        tokens = [routing[e] for e in members]
        return summed(expert_outputs(experts, architecture, in_float32, gathered(inputs[begin:stop], tokens), tokens),
                      tokens, stop - begin)

    return torch.cat([output(begin, stop, routing) for begin, stop, routing in chunks])


def fit_in_groups(experts: nn.Module, architecture: Architecture, inputs: torch.Tensor, target: torch.Tensor,
                  chunks: list, energy: float, fitted: list[str], groups: list[list[int]], steps: int, history: int,
                  whiten: bool, anchor: float) -> tuple[float, float, int]:
    """Fit the layer a group at a time, in order. The layer's residual (target minus every expert's output) is
    kept up to date, so a group's target is the residual plus its own output, and a group costs its own
    tokens only (not a pass of all the others). Returns the layer's relative squared error before and after,
    and the error evaluations of all the groups' fits."""
    residual = target - current_output(experts, architecture, inputs, chunks, range(experts.down_proj.shape[0]))
    before, evaluations = float(residual.double().pow(2).sum()) / energy, 0
    for group in groups:
        own = current_output(experts, architecture, inputs, chunks, group)
        evaluations += fit_group(experts, architecture, inputs, residual + own, chunks, energy, fitted, group, steps,
                                 history, whiten, anchor)[2]
        residual += own - current_output(experts, architecture, inputs, chunks, group)
        trim_heap()  # the group's working set (L-BFGS's copies) was just freed: 0.4 GB more resident without
    return before, float(residual.double().pow(2).sum()) / energy, evaluations


def fit_group(experts: nn.Module, architecture: Architecture, inputs: torch.Tensor, target: torch.Tensor, chunks: list,
              energy: float, fitted: list[str], group: range | list[int], steps: int, history: int,
              whiten: bool, anchor: float = 0.0) -> tuple[float, float, int]:
    """Fit the experts of `group` in place to `target`, what the layer's other experts, held as they are, leave
    of the original output; returns the layer's relative squared error before and after (never worse: a fit
    that does not improve it is not kept) and how many times L-BFGS evaluated the error with its gradient."""
    whitenings = expert_whitenings(experts, architecture, inputs, chunks, group) if whiten else [None] * len(group)
    chunks = [(begin, stop, [routing[e] for e in group]) for begin, stop, routing in chunks]
    reads = [gathered(inputs[begin:stop], routing) for begin, stop, routing in chunks]
    tensors = [one_expert(experts, e, fitted, whitened) for e, whitened in zip(group, whitenings)]

    def weights() -> list[dict[str, torch.Tensor]]:
        return parallel_map(lambda i: expert_weights(experts, group[i], tensors[i], whitenings[i], architecture.transposed),
                            range(len(group)))

    def over_chunks(loss, backward: bool) -> float:
        """Sum `loss(predicted, begin, stop)` over the token chunks, with the weights the leaves stand for
        built once (not once per chunk: at real shapes W + D P costs as much as a chunk's experts); their
        gradients, accumulated over the chunks, are taken back to the leaves at the end. In each chunk the
        experts run on the workers, then the loss's gradient with respect to the summed output is taken
        back through each expert on the workers: each expert's graph is its own, so the gradients do not
        depend on which worker ran it."""
        with torch.no_grad():
            built = weights()
        if whiten:  # a whitened weight's stand-in collects its gradient; other leaves (biases) are used as they are
            built = [own | {name: own[name].detach().requires_grad_(backward) for name in whitened}
                     for own, whitened in zip(built, whitenings)]
        total = 0.0
        for (begin, stop, routing), chunk_reads in zip(chunks, reads):
            outputs = expert_outputs(experts, architecture, built.__getitem__, chunk_reads, routing)
            predicted = summed([output.detach() for output in outputs], routing, stop - begin).requires_grad_(backward)
            value = loss(predicted, begin, stop)
            if backward:
                backward_each(outputs, torch.autograd.grad(value, predicted)[0], routing)
            total += float(value.detach())
        if whiten and backward:
            def take_back(i: int) -> None:
                for name, p in whitenings[i].items():
                    tensors[i][name].grad = leaf_gradient(built[i][name].grad, p, architecture.transposed)
            parallel_map(take_back, range(len(group)))
        return total

    def random_projection(generator: torch.Generator) -> None:
        over_chunks(lambda predicted, begin, stop: (predicted * torch.randn(predicted.shape, generator=generator)
                                                    .to(inputs.device)).sum(), backward=True)

    def error(backward: bool) -> torch.Tensor:
        value = over_chunks(lambda predicted, begin, stop: (target[begin:stop] - predicted).pow(2).sum() / energy,
                            backward)
        return torch.tensor(value, dtype=torch.float64)

    optimizer = torch.optim.LBFGS([own[name] for own in tensors for name in fitted], lr=1.0, max_iter=steps,
                                  history_size=history, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        return error(backward=True) + anchor_penalty(tensors, whitenings, anchor / energy)

    with torch.no_grad():
        before = float(error(backward=False))
    with torch.enable_grad():
        if whiten:
            balance_whitenings(whitenings, tensors, random_projection)
        optimizer.step(closure)
    with torch.no_grad():
        after = float(error(backward=False))
        if after < before:  # never keep a worse layer (L-BFGS's line search should not give one)
            fitted_weights = weights()
            for name in fitted:
                stored = getattr(experts, name)
                fitted_tensor = torch.cat([own[name].detach() for own in fitted_weights])
                stored.data[list(group)] = fitted_tensor.to(stored.dtype)
    return before, min(before, after), int(optimizer.state[optimizer.param_groups[0]["params"][0]]["func_evals"])
