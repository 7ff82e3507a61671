"""The pipeline in one call: calibrate -> plan -> apply -> (save)."""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from hcsmoe import __version__
from hcsmoe.adapters import (
    Architecture,
    MoELayer,
    architecture_for,
    check_k_for,
    expert_count,
    group_limits,
    moe_layers,
    set_expert_count,
    top_k,
)
from hcsmoe.apply import apply_layer, apply_plan, install, layer_copy
from hcsmoe.calibrate import Statistics
from hcsmoe.data import interleave, load_texts, source_parts, token_blocks
from hcsmoe.distributed import SINGLE, World
from hcsmoe.errors import UserError
from hcsmoe.formats import Format, Plain, drop_quantization, format_of
from hcsmoe.layerwise import calibrate_model
from hcsmoe.loading import STORED, load_config, load_model, load_tokenizer, model_dir, parse_dtype
from hcsmoe.plan import (
    LayerPlan,
    Plan,
    PerLayerChoice,
    WithinRoutingGroups,
    check_k,
    make_planner,
    plan_model,
    ROUTERS,
    plan_of,
    plan_with_layers,
    planner_merge,
)
from hcsmoe.refit import RefitOptions, choose_layer_plan, fit_compressed_layer, fitting_tokens
from hcsmoe.router_fit import RouterFitOptions, check_router_fit
from hcsmoe.sampling import SELF_SOURCE, sampled_blocks
from hcsmoe.save import atomic_directory, check_output_dir, plot_dendrograms, write_expert_counts


# English, French and Spanish train text interleaved: on held-out train text of the reference model it
# beats English-only calibration even on English at 50% removed (benchmarks/results/choices.md).
DEFAULT_CALIBRATION = "wiki:en,fr,es"
# Calibration tokens when --blocks is not given (32 blocks of 2048, or 256 of the reference model's 256): the
# fits keep improving up to here (benchmarks/results/quality-*.md, "Calibration size").
CALIBRATION_TOKENS = 65536


@dataclass
class CompressionResult:
    """The compressed model with everything needed to save, inspect or re-plan it."""

    model: PreTrainedModel
    tokenizer: object
    plan: Plan
    stats: Statistics
    architecture: Architecture
    source: Path | None
    info: dict = field(default_factory=dict)
    saved: Path | None = None  # where a streaming run already wrote the checkpoint
    keep_format: bool = False  # save in the source checkpoint's quantized format (the model holds float32)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write an ordinary checkpoint plus plan, dendrograms and model card; atomically."""
        if self.model is None:
            raise UserError(f"this result was streamed and is already saved in {self.saved}")
        target = check_output_dir(out, self.source, overwrite)
        with atomic_directory(target, overwrite) as directory:
            if self.keep_format:
                from hcsmoe.streaming import save_in_stored_format

                save_in_stored_format(self.model, self.source, self.plan, directory)
            else:
                self.model.save_pretrained(directory)
            self.write_extras(directory)
        return target

    def write_extras(self, directory: Path) -> None:
        """Tokenizer, plan, dendrograms and model card beside the weights."""
        write_expert_counts(directory, self.architecture.count_keys, self.info["experts_after"])
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        self.plan.save(directory / "hcsmoe_plan.json")
        plot_dendrograms(self.plan, directory / "dendrograms.png")
        self.write_card(directory)

    def write_card(self, directory: Path, evaluation: dict | None = None) -> None:
        """(Re)write the model card, replacing it in one rename."""
        partial = directory / ".README.md.partial"
        partial.write_text(model_card(self, (directory / "dendrograms.png").exists(), evaluation))
        partial.replace(directory / "README.md")


def experts_to_keep(num_experts: int, k: int | None, ratio: float | None) -> int:
    """K from --experts, or from --ratio (the fraction of experts to remove); half by default."""
    if k is not None and ratio is not None:
        raise UserError("give either --experts or --ratio, not both")
    if k is not None:
        return int(k)
    ratio = 0.5 if ratio is None else float(ratio)
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--ratio is the fraction of experts to remove and must lie in (0, 1), got {ratio}")
    return num_experts - round(ratio * num_experts)


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint was saved in (float32 when the config does not say)."""
    dtype = getattr(config, "dtype", None) or torch.float32
    return parse_dtype(dtype) if isinstance(dtype, str) else dtype


def calibration_blocks(tokenizer, source: str, num_blocks: int | None, block_size: int, context: int,
                       model: nn.Module | None = None, seed: int = 0) -> torch.Tensor:
    """num_blocks blocks of min(block_size, context) tokens; None: enough blocks for CALIBRATION_TOKENS.
    A source of several parts joined by '+' (`wiki:en+self`) takes its blocks from each part in turn; the
    `self` part is sampled from `model` (which must then be given: it runs the whole model)."""
    length = min(block_size, context)
    if num_blocks is None:
        num_blocks = -(-CALIBRATION_TOKENS // max(length, 1))
    if num_blocks <= 0 or block_size <= 1:
        raise UserError("calibration needs at least one block of at least two tokens")
    parts = source_parts(source)
    if SELF_SOURCE in parts and model is None:
        raise UserError("calibration 'self' samples text from the whole model, which a streaming run (--stream, "
                        "torchrun, or a model too large for memory) never holds: run with --no-stream, or sample "
                        "text with your own serving stack and pass it as a .txt file")
    counts = [num_blocks // len(parts) + (i < num_blocks % len(parts)) for i in range(len(parts))]
    blocks = [sampled_blocks(model, tokenizer, count, length, seed) if part == SELF_SOURCE
              else token_blocks(tokenizer, load_texts(part), length, count, part)
              for part, count in zip(parts, counts) if count]
    return torch.stack(interleave([list(b) for b in blocks]))


def normalizes_top_k(layers: list[MoELayer]) -> bool:
    """Whether the routers renormalise the top-k weights (Mixtral's always do and have no flag)."""
    return bool(getattr(layers[0].router, "norm_topk_prob", True))


# The default compressor, chosen on held-out train text of both bundled models (benchmarks/choices.py): per
# layer, the better on held-out calibration tokens of two plans, each fitted to the original layer (router
# fit, then down-projection refit): the K most salient experts (REAP) anchoring pairs whose merged expert
# keeps the members' neurons that best reproduce the pair's output (least squares), or REAP's pruning. Options a caller leaves unset take these
# values when no method is named.
DEFAULT_RECIPE = {
    "candidates": [("ream", {"merge": "select", "group_size": 0, "assignment": "nearest"}), ("reap", {})],
    "refit": RefitOptions(),
    "router_fit": RouterFitOptions(only_if_softmax=True),
    "sequential": "corrective",
}
SEQUENTIAL_MODES = (False, True, "corrective")


def resolve_fits(method: str | None, refit: RefitOptions | bool | None, router_fit: RouterFitOptions | bool | None):
    """The fitting stages: the default recipe's when no method is named, a named method's only if asked for."""
    if method is None:
        refit = DEFAULT_RECIPE["refit"] if refit is None or refit is True else refit
        router_fit = DEFAULT_RECIPE["router_fit"] if router_fit is None or router_fit is True else router_fit
    else:
        refit = RefitOptions() if refit is True else refit
        router_fit = RouterFitOptions() if router_fit is True else router_fit
    return refit or None, router_fit or None


def build_planner(method: str | None, config, architecture: Architecture, context: dict, **options):
    """The planner for a named method, or the default recipe's per-layer choice (user options go to its
    merging candidate); with group-limited routing, each candidate plans each routing group on its own."""
    if method is None:
        (merging, defaults), *others = DEFAULT_RECIPE["candidates"]
        chosen = defaults | {k: v for k, v in options.items() if v is not None}
        candidates = [make_planner(merging, **chosen, **context)]
        candidates += [make_planner(name, **extra, **context) for name, extra in others]
        return PerLayerChoice([within_routing_groups(c, config, architecture) for c in candidates])
    return within_routing_groups(make_planner(method, **options, **context), config, architecture)


def calibration_statistics(
    model: PreTrainedModel,
    architecture: Architecture,
    layers: list[MoELayer],
    tokenizer,
    source: str,
    *,
    num_blocks: int | None = None,
    block_size: int = 2048,
    batch_size: int = 4,
    output_samples: int = 0,
    with_weight_gram: bool = False,
    after_layer=None,
    offload_dir: Path | None = None,
    progress: bool = True,
    corrective: bool = False,
    seed: int = 0,
) -> Statistics:
    """Calibrate every MoE layer on `source` text (`seed`: of the `self` part's sampling), recording how the
    statistics were made."""
    context = int(getattr(model.config, "max_position_embeddings", block_size))
    blocks = calibration_blocks(tokenizer, source, num_blocks, block_size, context, model, seed)
    layer_stats = calibrate_model(model, architecture, blocks, batch_size=batch_size, output_samples=output_samples,
                                  with_weight_gram=with_weight_gram, after_layer=after_layer,
                                  offload_dir=offload_dir, progress=progress, corrective=corrective)
    info = {"calibration": source, "blocks": list(blocks.shape), "tokens": int(blocks.numel()),
            "norm_topk_prob": normalizes_top_k(layers)}
    return Statistics(layer_stats, top_k(model.config, architecture), info)


def compress(
    model_or_path: PreTrainedModel | str | Path | None = None,
    *,
    num_experts: int | None = None,
    ratio: float | None = None,
    method: str | None = None,
    linkage: str | None = None,
    metric: str | None = None,
    merge: str | None = None,
    group_size: int | None = None,
    assignment: str | None = None,
    representation: str | None = None,
    max_group_size: int | None = None,
    router: str = "dominant",
    max_subsets: int | None = None,
    output_samples: int | None = None,
    calibration: str = DEFAULT_CALIBRATION,
    num_blocks: int | None = None,
    block_size: int = 2048,
    batch_size: int = 4,
    tokenizer=None,
    stats: Statistics | None = None,
    plan: Plan | None = None,
    sequential: bool | str | None = None,
    refit: RefitOptions | bool | None = None,
    router_fit: RouterFitOptions | bool | None = None,
    stream_to: str | Path | None = None,
    keep_samples: bool = True,
    offload_dir: str | Path | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
    world: World = SINGLE,
) -> CompressionResult:
    """Compress an MoE model to K experts per layer.

    `method=None` is the default compressor (DEFAULT_RECIPE: REAP-anchored groups, neuron selection, router
    and down-projection fits); any named method (e.g. "hc-smoe", "reap") runs as published, with the fitting
    stages only if asked (`refit=True` or RefitOptions, `router_fit=True` or RouterFitOptions).
    `model_or_path` is a checkpoint directory (None: the bundled reference model) or a loaded model,
    which is copied, never modified. Computation runs in float32; the result is cast to `dtype`
    (default: the checkpoint's own dtype). Pass `stats` to skip calibration, `plan` to skip planning.
    `sequential`: True calibrates each layer on the outputs of the already-compressed layers before it;
    "corrective" also fits it so that its output matches the original model's layer output (upstream drift
    included); None: the recipe's ("corrective") when no method is named, else False.
    `stream_to`: read, compress and write one layer at a time straight into that directory (for models
    larger than memory); the result then holds no model and is already saved. `keep_samples=False` lets a
    streaming run drop each finished layer's per-token samples (its statistics can then not re-fit an lsq router).
    `offload_dir`: keep the calibration's per-token buffers in memory-mapped files there (streaming does
    this by itself, inside its output's temporary directory, when they would take over 1/4 of free memory).
    `world` (streaming only): this process is one rank of a torchrun job (`distributed.join`): expert-parallel.
    """
    if router not in ROUTERS:
        raise UserError(f"unknown router method {router!r}; choose one of: {', '.join(ROUTERS)}")
    if plan is not None:  # a plan is re-applied with the fits it records, unless told otherwise
        method = method or plan.method
        refit = (RefitOptions(**plan.refit) if plan.refit else False) if refit is None else refit
        router_fit = (RouterFitOptions(**plan.router_fit) if plan.router_fit else False) if router_fit is None else router_fit
        sequential = plan.sequential if sequential is None else sequential
    refit, router_fit = resolve_fits(method, refit, router_fit)
    if sequential is None:  # re-planning from a statistics file runs no layer: nothing is sequential
        sequential = DEFAULT_RECIPE["sequential"] if method is None and stats is None else False
    if sequential not in SEQUENTIAL_MODES:
        raise UserError(f"unknown sequential mode {sequential!r}; use True, False or 'corrective'")
    if sequential and stats is not None:
        raise UserError("sequential mode calibrates each layer after compressing the ones before it; it cannot "
                        "re-plan from a statistics file: drop --stats or --sequential")
    if world.size > 1 and stream_to is None:
        raise UserError("a torchrun job compresses with --stream (each rank reads its share of the experts from disk)")
    if stream_to is not None:
        if isinstance(model_or_path, PreTrainedModel):
            raise UserError("streaming reads a checkpoint directory; pass its path instead of a loaded model")
        return compress_streaming(
            model_or_path, stream_to, overwrite=overwrite, num_experts=num_experts, ratio=ratio, method=method,
            linkage=linkage, metric=metric, merge=merge, group_size=group_size, assignment=assignment,
            representation=representation,
            max_group_size=max_group_size, router=router,
            max_subsets=max_subsets, output_samples=output_samples, calibration=calibration, num_blocks=num_blocks,
            block_size=block_size, batch_size=batch_size, tokenizer=tokenizer, stats=stats, plan=plan,
            sequential=sequential, refit=refit, router_fit=router_fit, keep_samples=keep_samples,
            offload_dir=offload_dir, dtype=dtype, device=device,
            seed=seed, progress=progress, world=world)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    fmt: Format = Plain()
    if isinstance(model_or_path, PreTrainedModel):
        source = None
        output_dtype = parse_dtype(dtype) if dtype else next(model_or_path.parameters()).dtype
        model = copy.deepcopy(model_or_path).float().eval()
        if tokenizer is None and stats is None:
            raise UserError("pass tokenizer= with a model object (needed to tokenize calibration text)")
    else:
        source = model_dir(model_or_path)
        config = load_config(source)
        fmt = format_of(config)
        output_dtype = output_dtype_for(fmt, dtype, config)
        model = load_model(source, held_dtype(fmt, output_dtype, config), device)
        tokenizer = tokenizer or load_tokenizer(source)
    architecture = architecture_for(model.config)
    layers = moe_layers(model, architecture)
    e, k_route = layers[0].num_experts, top_k(model.config, architecture)
    k = experts_to_keep(e, num_experts, ratio)
    check_k(k, e, k_route)
    check_k_for(model.config, architecture, k)
    context = {"seed": seed, "max_subsets": max_subsets, "top_k": k_route, "norm_topk_prob": normalizes_top_k(layers)}
    planner = None if plan is not None else build_planner(
        method, model.config, architecture, context, linkage=linkage, metric=metric, merge=merge,
        representation=representation, max_group_size=max_group_size, group_size=group_size, assignment=assignment)
    timings["load"] = time.perf_counter() - start

    router_fit = check_fitting(architecture, stats, refit, router_fit)
    fitting = refit is not None or router_fit is not None
    if stats is None and (plan is None or plan.router == "lsq" or plan.merge != "weighted" or fitting):
        mark = time.perf_counter()
        if output_samples is None:
            output_samples = 512 if getattr(planner, "needs_output_samples", False) else 0
        if plan is not None:
            check_plan_layers(plan, layers)
        layer_plans: list[LayerPlan] = []
        after_layer = compress_layer_in_place(planner, plan, k, router, architecture, k_route, layer_plans,
                                              refit=refit, router_fit=router_fit,
                                              output_dtype=output_dtype or torch.float32,
                                              sequential=sequential)
        stats = calibration_statistics(model, architecture, layers, tokenizer, calibration, num_blocks=num_blocks,
                                       block_size=block_size, batch_size=batch_size, output_samples=output_samples,
                                       with_weight_gram=representation == "weights", after_layer=after_layer,
                                       offload_dir=Path(offload_dir) if offload_dir else None, progress=progress,
                                       corrective=sequential == "corrective", seed=seed)
        stats.info["sequential"] = sequential
        plan = plan_with_layers(plan, planner, router, layer_plans, as_dict(refit), as_dict(router_fit), sequential)
        set_expert_count(model.config, architecture, k)
        timings["calibrate+compress"] = time.perf_counter() - mark
    else:
        mark = time.perf_counter()
        if plan is None:
            plan = plan_model(stats.layers, k, k_route, planner, router)
        timings["plan"] = time.perf_counter() - mark
        mark = time.perf_counter()
        apply_plan(model, architecture, layers, plan, stats.layers if stats else None, progress=progress)
        timings["apply"] = time.perf_counter() - mark
    if output_dtype is not None:
        model.to(output_dtype)
        drop_quantization(model.config)
    info = run_info(source, architecture, e, plan, k_route, output_dtype, seed, timings, fmt)
    return CompressionResult(model, tokenizer, plan, stats, architecture, source, info, keep_format=output_dtype is None)


def within_routing_groups(planner, config, architecture: Architecture):
    """With group-limited routing (DeepSeek), plan each routing group on its own."""
    limits = group_limits(config, architecture)
    return WithinRoutingGroups(planner, limits[0]) if limits and limits[0] > 1 else planner


def run_info(source, architecture: Architecture, e: int, plan: Plan, k_route: int, output_dtype: torch.dtype | None,
             seed: int, timings: dict, fmt: Format = Plain()) -> dict:
    """What the run did, for the model card and the summary; `output_dtype` None: saved in the input's format."""
    return {
        "source": str(source) if source else None,
        "architecture": architecture.name,
        "experts_before": e,
        "experts_after": len(plan.layers[0].groups),
        "top_k": k_route,
        "dtype": saved_format(fmt, output_dtype),
        "seed": seed,
        "seconds": {name: round(value, 3) for name, value in timings.items()},
        "hcsmoe_version": __version__,
    }


def saved_format(fmt: Format, output_dtype: torch.dtype | None) -> str:
    if output_dtype is not None:
        return str(output_dtype).removeprefix("torch.")
    return f"{fmt.description} as in the input, other tensors in their stored dtype"


def held_dtype(fmt: Format, output_dtype: torch.dtype | None, config) -> str:
    """How the in-memory path holds the model: as stored when the output keeps the checkpoint's dtype (a bf16
    model stays bf16, each layer computed in float32 in turn: one copy of the weights), else in float32."""
    return STORED if not fmt.quantized and output_dtype == checkpoint_dtype(config) else "float32"


def output_dtype_for(fmt: Format, dtype: str | None, config) -> torch.dtype | None:
    """--dtype when given; else the checkpoint's dtype, or None (keep the stored format) for a quantized one."""
    if dtype:
        return parse_dtype(dtype)
    return None if fmt.quantized else checkpoint_dtype(config)


def check_plan_layers(plan: Plan, layers: list[MoELayer]) -> None:
    """A given plan must cover every MoE layer with one expert count (checked before any work)."""
    plan.validate()
    planned = {lp.layer: len(lp.groups) for lp in plan.layers}
    missing = [m.index for m in layers if m.index not in planned]
    if missing:
        raise UserError(f"the plan has no entry for MoE layers {missing}")
    if len({planned[m.index] for m in layers}) != 1:
        raise UserError(f"the plan keeps different expert counts per layer ({sorted(set(planned.values()))}); "
                        "the config allows one")


def check_fitting(architecture: Architecture, stats: Statistics | None, refit: RefitOptions | None,
                  router_fit: RouterFitOptions | None) -> RouterFitOptions | None:
    """Refuse fitting what cannot be fitted, before any work; returns the router fit that applies (the
    default recipe's is skipped for a family whose router is not a softmax)."""
    if router_fit is not None and router_fit.only_if_softmax and architecture.routing != "softmax":
        router_fit = None
    if stats is not None and (refit is not None or router_fit is not None):
        raise UserError("fitting the compressed layers needs the model's per-token outputs, which a statistics file "
                        "does not hold; drop --stats, or add --no-refit --no-fit-router to re-plan from it")
    if router_fit is not None:
        check_router_fit(architecture)
    return router_fit


def as_dict(options) -> dict | None:
    return options.to_dict() if options is not None else None


def compress_layer_in_place(planner, given: Plan | None, k: int, router: str, architecture: Architecture,
                            k_route: int, layer_plans: list[LayerPlan], *, refit: RefitOptions | None,
                            router_fit: RouterFitOptions | None, output_dtype: torch.dtype, sequential: bool | str):
    """The per-layer step of the in-memory path, run as soon as a layer is calibrated: plan it (or take the
    given plan's layer), apply the plan, then fit the compressed layer to the original's output. Returns
    whether the next layers see the compressed layer (sequential mode) or the original."""
    given_layers = {lp.layer: lp for lp in given.layers} if given is not None else {}

    def compressed_copy(moe: MoELayer, stats):
        def compressed(plan: Plan, layer_plan: LayerPlan) -> MoELayer:
            trial = layer_copy(moe)
            apply_layer(trial, architecture, layer_plan, plan, stats, k_route)
            return trial
        return compressed

    def after_layer(moe: MoELayer, stats, block) -> bool:
        if isinstance(planner, PerLayerChoice) and given is None:
            _, layer_plan, chosen = choose_layer_plan(planner.candidate_plans(stats, k, router),
                                                      compressed_copy(moe, stats), architecture, stats, block,
                                                      output_dtype, refit, router_fit)
            install(moe, chosen)
        else:
            if given is not None:
                layer_plan_of, layer_plan = given, copy.deepcopy(given_layers[moe.index])
            else:
                layer_plan = planner.plan_layer(stats, k)
                layer_plan_of = plan_of(planner, router, [layer_plan])
            apply_layer(moe, architecture, layer_plan, layer_plan_of, stats, k_route)
            fit_compressed_layer(moe, architecture, layer_plan, stats, fitting_tokens(layer_plan, block), output_dtype,
                                 refit, router_fit)
        layer_plans.append(layer_plan)
        return bool(sequential)

    return after_layer


def token_buffer_bytes(blocks: torch.Tensor, config) -> int:
    """Memory the calibration's per-token buffers take during a layer: hidden states, the MoE block's
    inputs, its routed output and the layer's outputs, float32."""
    return 4 * blocks.numel() * int(config.hidden_size) * 4


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); unlimited where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


def compress_streaming(model_path, out, *, overwrite: bool, num_experts, ratio, method, linkage, metric, merge,
                       group_size, assignment, representation, max_group_size, router, max_subsets, output_samples,
                       calibration, num_blocks, block_size, batch_size, tokenizer, stats, plan, sequential,
                       refit, router_fit, keep_samples,
                       offload_dir, dtype, device, seed, progress, world: World = SINGLE) -> CompressionResult:
    """The streaming path of `compress`: one decoder layer in memory at a time, written as it is done."""
    from hcsmoe.streaming import StreamingCompressor, run_streaming, write_config

    timings: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    source = model_dir(model_path)
    target = check_output_dir(out, source, overwrite)
    config = load_config(source)
    architecture = architecture_for(config)
    e, k_route = expert_count(config, architecture), top_k(config, architecture)
    k = len(plan.layers[0].groups) if plan else experts_to_keep(e, num_experts, ratio)
    check_k(k, e, k_route)
    check_k_for(config, architecture, k)
    fmt = format_of(config)
    output_dtype = output_dtype_for(fmt, dtype, config)
    tokenizer = tokenizer or load_tokenizer(source)
    if plan is not None:
        plan.validate()
    router_fit = check_fitting(architecture, stats, refit, router_fit)
    fitting = refit is not None or router_fit is not None
    if world.size > e:
        raise UserError(f"{world.size} ranks for {e} experts per layer: start at most {e} processes")
    with atomic_directory(target, overwrite, world) as directory:
        compressor = StreamingCompressor(source, config, architecture, output_dtype, directory, device, progress, world)
        meta_layers = moe_layers(compressor.model, architecture)
        context = {"seed": seed, "max_subsets": max_subsets, "top_k": k_route,
                   "norm_topk_prob": normalizes_top_k(meta_layers)}
        planner = None if plan is not None else build_planner(
            method, config, architecture, context, linkage=linkage, metric=metric, merge=merge,
            representation=representation, max_group_size=max_group_size, group_size=group_size,
            assignment=assignment)
        merge_kind = plan.merge if plan else planner_merge(planner)
        calibrating = stats is None and (plan is None or plan.router == "lsq" or fitting or merge_kind != "weighted")
        blocks = None
        if calibrating:
            context = int(getattr(config, "max_position_embeddings", block_size))
            blocks = calibration_blocks(tokenizer, calibration, num_blocks, block_size, context)
        if output_samples is None:
            output_samples = 512 if getattr(planner, "needs_output_samples", False) else 0
        if offload_dir is None and blocks is not None and token_buffer_bytes(blocks, config) > available_memory() / 4:
            offload_dir = directory / ".token-buffers"
        plan, layer_stats = run_streaming(
            compressor, k=k, planner=planner, router=router, blocks=blocks, batch_size=batch_size,
            output_samples=output_samples, with_weight_gram=representation == "weights",
            stats_in=stats.layers if stats else None, plan_in=plan, keep_samples=keep_samples,
            offload_dir=Path(offload_dir) if offload_dir else None, top_k=k_route, refit=refit, router_fit=router_fit,
            sequential=sequential)
        compressor.writer.finish()
        if offload_dir is not None and Path(offload_dir).parent == directory and world.leader:
            shutil.rmtree(offload_dir, ignore_errors=True)
        if calibrating:
            info = {"calibration": calibration, "blocks": list(blocks.shape), "tokens": int(blocks.numel()),
                    "norm_topk_prob": normalizes_top_k(meta_layers), "sequential": sequential}
            stats = Statistics(layer_stats, k_route, info)
        plan.world_size = world.size
        timings["total"] = time.perf_counter() - start
        info = run_info(source, architecture, e, plan, k_route, output_dtype, seed, timings, fmt)
        info["streamed"] = True
        result = CompressionResult(None, tokenizer, plan, stats, architecture, source, info, saved=target)
        if world.leader:
            write_config(source, config, architecture, k, output_dtype, directory)
            result.write_extras(directory)
    return result


def model_card(result: CompressionResult, has_dendrograms: bool, evaluation: dict | None) -> str:
    """A README saying what this checkpoint is and exactly how it was made."""
    info, plan = result.info, result.plan
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mixture-of-experts, hcsmoe, expert-merging]",
        "---",
        f"# {info['architecture']} compressed from {info['experts_before']} to {info['experts_after']} experts per layer",
        "",
        f"Made by hcsmoe {info['hcsmoe_version']} from `{info['source'] or 'an in-memory model'}`.",
        "Loads with plain `transformers`: `AutoModelForCausalLM.from_pretrained(this_directory)`.",
        "",
        "## How",
        f"- method: `{plan.method}` with options `{json.dumps(plan.options)}`; router rows: `{plan.router}`",
        f"- calibration: `{json.dumps(result.stats.info) if result.stats else 'plan applied without statistics'}`",
        f"- top-k routing unchanged ({info['top_k']}); weights saved as {info['dtype']}; seed {info['seed']}",
        "- `hcsmoe_plan.json`: per layer, which original experts form each merged expert, with their routing"
        " frequencies and merge weights (re-apply or edit it with `hcsmoe compress --plan`).",
    ]
    if has_dendrograms:
        lines.append("- `dendrograms.png`: the clustering tree of every layer.")
    if evaluation:
        lines += ["", "## Evaluation", "", "```", evaluation.get("table", ""), "```"]
    return "\n".join(lines) + "\n"
