"""The pipeline in one call: calibrate -> plan -> apply -> (save)."""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
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
from hcsmoe.apply import apply_layer, apply_plan
from hcsmoe.calibrate import Statistics
from hcsmoe.data import load_texts, token_blocks
from hcsmoe.errors import UserError
from hcsmoe.layerwise import calibrate_model
from hcsmoe.loading import load_config, load_model, load_tokenizer, model_dir, parse_dtype
from hcsmoe.plan import LayerPlan, Plan, WithinRoutingGroups, check_k, make_planner, plan_model, plan_of
from hcsmoe.save import atomic_directory, check_output_dir, plot_dendrograms, write_expert_counts


# English, French and Spanish train text interleaved: on held-out train text of the reference model it
# beats English-only calibration even on English at 50% removed (benchmarks/results/choices.md).
DEFAULT_CALIBRATION = "wiki:en,fr,es"


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

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write an ordinary checkpoint plus plan, dendrograms and model card; atomically."""
        if self.model is None:
            raise UserError(f"this result was streamed and is already saved in {self.saved}")
        target = check_output_dir(out, self.source, overwrite)
        with atomic_directory(target) as directory:
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


def calibration_blocks(tokenizer, source: str, num_blocks: int, block_size: int, context: int) -> torch.Tensor:
    if num_blocks <= 0 or block_size <= 1:
        raise UserError("calibration needs at least one block of at least two tokens")
    return token_blocks(tokenizer, load_texts(source), min(block_size, context), num_blocks, source)


def normalizes_top_k(layers: list[MoELayer]) -> bool:
    """Whether the routers renormalise the top-k weights (Mixtral's always do and have no flag)."""
    return bool(getattr(layers[0].router, "norm_topk_prob", True))


def calibration_statistics(
    model: PreTrainedModel,
    architecture: Architecture,
    layers: list[MoELayer],
    tokenizer,
    source: str,
    *,
    num_blocks: int = 32,
    block_size: int = 2048,
    batch_size: int = 4,
    output_samples: int = 0,
    with_weight_gram: bool = False,
    after_layer=None,
    offload_dir: Path | None = None,
    progress: bool = True,
) -> Statistics:
    """Calibrate every MoE layer on `source` text, recording how the statistics were made."""
    context = int(getattr(model.config, "max_position_embeddings", block_size))
    blocks = calibration_blocks(tokenizer, source, num_blocks, block_size, context)
    layer_stats = calibrate_model(model, architecture, blocks, batch_size=batch_size, output_samples=output_samples,
                                  with_weight_gram=with_weight_gram, after_layer=after_layer,
                                  offload_dir=offload_dir, progress=progress)
    info = {"calibration": source, "blocks": list(blocks.shape), "tokens": int(blocks.numel()),
            "norm_topk_prob": normalizes_top_k(layers)}
    return Statistics(layer_stats, top_k(model.config, architecture), info)


def compress(
    model_or_path: PreTrainedModel | str | Path | None = None,
    *,
    num_experts: int | None = None,
    ratio: float | None = None,
    method: str = "hc-smoe",
    linkage: str = "average",
    metric: str = "euclidean",
    merge: str = "frequency",
    representation: str = "expert-output",
    max_group_size: int | None = None,
    router: str = "dominant",
    max_subsets: int = 10000,
    output_samples: int | None = None,
    calibration: str = DEFAULT_CALIBRATION,
    num_blocks: int = 32,
    block_size: int = 2048,
    batch_size: int = 4,
    tokenizer=None,
    stats: Statistics | None = None,
    plan: Plan | None = None,
    sequential: bool = False,
    stream_to: str | Path | None = None,
    keep_samples: bool = True,
    offload_dir: str | Path | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> CompressionResult:
    """Compress an MoE model to K experts per layer with HC-SMoE (or another planner).

    `model_or_path` is a checkpoint directory (None: the bundled reference model) or a loaded model,
    which is copied, never modified. Computation runs in float32; the result is cast to `dtype`
    (default: the checkpoint's own dtype). Pass `stats` to skip calibration, `plan` to skip planning.
    `sequential`: each layer is calibrated on the outputs of the already-compressed layers before it.
    `stream_to`: read, compress and write one layer at a time straight into that directory (for models
    larger than memory); the result then holds no model and is already saved. `keep_samples=False` lets a
    streaming run drop each finished layer's per-token samples (its statistics can then not re-fit an lsq router).
    `offload_dir`: keep the calibration's per-token buffers in memory-mapped files there (streaming does
    this by itself, inside its output's temporary directory, when they would take over 1/4 of free memory).
    """
    if stream_to is not None:
        if isinstance(model_or_path, PreTrainedModel):
            raise UserError("streaming reads a checkpoint directory; pass its path instead of a loaded model")
        return compress_streaming(
            model_or_path, stream_to, overwrite=overwrite, num_experts=num_experts, ratio=ratio, method=method,
            linkage=linkage, metric=metric, merge=merge, representation=representation,
            max_group_size=max_group_size, router=router,
            max_subsets=max_subsets, output_samples=output_samples, calibration=calibration, num_blocks=num_blocks,
            block_size=block_size, batch_size=batch_size, tokenizer=tokenizer, stats=stats, plan=plan,
            sequential=sequential, keep_samples=keep_samples, offload_dir=offload_dir, dtype=dtype, device=device,
            seed=seed, progress=progress)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    if isinstance(model_or_path, PreTrainedModel):
        source = None
        original_dtype = next(model_or_path.parameters()).dtype
        model = copy.deepcopy(model_or_path).float().eval()
        if tokenizer is None and stats is None:
            raise UserError("pass tokenizer= with a model object (needed to tokenize calibration text)")
    else:
        source = model_dir(model_or_path)
        original_dtype = checkpoint_dtype(load_config(source))
        model = load_model(source, "float32", device)
        tokenizer = tokenizer or load_tokenizer(source)
    output_dtype = parse_dtype(dtype) if dtype else original_dtype
    architecture = architecture_for(model.config)
    layers = moe_layers(model, architecture)
    e, k_route = layers[0].num_experts, top_k(model.config, architecture)
    k = experts_to_keep(e, num_experts, ratio)
    check_k(k, e, k_route)
    check_k_for(model.config, architecture, k)
    planner = make_planner(method, linkage=linkage, metric=metric, merge=merge, representation=representation,
                           max_group_size=max_group_size, seed=seed, max_subsets=max_subsets, top_k=k_route,
                           norm_topk_prob=normalizes_top_k(layers))
    planner = within_routing_groups(planner, model.config, architecture)
    timings["load"] = time.perf_counter() - start

    applied = False
    if stats is None and (plan is None or plan.router == "lsq" or plan.merge == "fix-dom"):
        mark = time.perf_counter()
        if output_samples is None:
            output_samples = 512 if getattr(planner, "needs_output_samples", False) else 0
        after_layer = None
        if sequential:
            if plan is not None:
                raise UserError("--sequential plans each layer as it goes; it cannot apply a given --plan")
            layer_plans: list[LayerPlan] = []
            after_layer = compress_layer_in_place(planner, k, router, architecture, k_route, layer_plans)
        stats = calibration_statistics(model, architecture, layers, tokenizer, calibration, num_blocks=num_blocks,
                                       block_size=block_size, batch_size=batch_size, output_samples=output_samples,
                                       with_weight_gram=representation == "weights", after_layer=after_layer,
                                       offload_dir=Path(offload_dir) if offload_dir else None, progress=progress)
        stats.info["sequential"] = sequential
        if sequential:
            plan, applied = plan_of(planner, router, layer_plans), True
            set_expert_count(model.config, architecture, k)
        timings["calibrate"] = time.perf_counter() - mark

    mark = time.perf_counter()
    if plan is None:
        plan = plan_model(stats.layers, k, k_route, planner, router)
    timings["plan"] = time.perf_counter() - mark
    mark = time.perf_counter()
    if not applied:
        apply_plan(model, architecture, layers, plan, stats.layers if stats else None, progress=progress)
    model.to(output_dtype)
    timings["apply"] = time.perf_counter() - mark
    info = run_info(source, architecture, e, plan, k_route, output_dtype, seed, timings)
    return CompressionResult(model, tokenizer, plan, stats, architecture, source, info)


def within_routing_groups(planner, config, architecture: Architecture):
    """With group-limited routing (DeepSeek), plan each routing group on its own."""
    limits = group_limits(config, architecture)
    return WithinRoutingGroups(planner, limits[0]) if limits and limits[0] > 1 else planner


def run_info(source, architecture: Architecture, e: int, plan: Plan, k_route: int, output_dtype: torch.dtype,
             seed: int, timings: dict) -> dict:
    return {
        "source": str(source) if source else None,
        "architecture": architecture.name,
        "experts_before": e,
        "experts_after": len(plan.layers[0].groups),
        "top_k": k_route,
        "dtype": str(output_dtype).removeprefix("torch."),
        "seed": seed,
        "seconds": {name: round(value, 3) for name, value in timings.items()},
        "hcsmoe_version": __version__,
    }


def compress_layer_in_place(planner, k: int, router: str, architecture: Architecture, k_route: int,
                            layer_plans: list[LayerPlan]):
    """The sequential-mode hook: plan and merge each layer as soon as it is calibrated."""

    def after_layer(moe: MoELayer, stats) -> bool:
        layer_plan = planner.plan_layer(stats, k)
        layer_plans.append(layer_plan)
        apply_layer(moe, architecture, layer_plan, plan_of(planner, router, [layer_plan]), stats, k_route)
        return True

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
                       representation, max_group_size, router, max_subsets, output_samples, calibration,
                       num_blocks, block_size, batch_size, tokenizer, stats, plan, sequential, keep_samples,
                       offload_dir, dtype, device, seed, progress) -> CompressionResult:
    """The streaming path of `compress`: one decoder layer in memory at a time, written as it is done."""
    from hcsmoe.streaming import StreamingCompressor, check_streamable, run_streaming, write_config

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
    output_dtype = parse_dtype(dtype) if dtype else checkpoint_dtype(config)
    tokenizer = tokenizer or load_tokenizer(source)
    if plan is not None:
        plan.validate()
    with atomic_directory(target) as directory:
        compressor = StreamingCompressor(source, config, architecture, output_dtype, directory, device, progress)
        meta_layers = moe_layers(compressor.model, architecture)
        planner = make_planner(method, linkage=linkage, metric=metric, merge=merge, representation=representation,
                               max_group_size=max_group_size, seed=seed, max_subsets=max_subsets, top_k=k_route,
                               norm_topk_prob=normalizes_top_k(meta_layers))
        planner = within_routing_groups(planner, config, architecture)
        check_streamable(plan.merge if plan else ("fix-dom" if merge == "fix-dom" else "weighted"), sequential)
        calibrating = stats is None and (plan is None or plan.router == "lsq")
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
            offload_dir=Path(offload_dir) if offload_dir else None)
        if offload_dir is not None and Path(offload_dir).parent == directory:
            shutil.rmtree(offload_dir, ignore_errors=True)
        compressor.writer.finish()
        if calibrating:
            info = {"calibration": calibration, "blocks": list(blocks.shape), "tokens": int(blocks.numel()),
                    "norm_topk_prob": normalizes_top_k(meta_layers), "sequential": False}
            stats = Statistics(layer_stats, k_route, info)
        write_config(source, config, architecture, k, output_dtype, directory)
        timings["total"] = time.perf_counter() - start
        info = run_info(source, architecture, e, plan, k_route, output_dtype, seed, timings)
        info["streamed"] = True
        result = CompressionResult(None, tokenizer, plan, stats, architecture, source, info, saved=target)
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
