"""Compress a checkpoint larger than memory: read, calibrate, merge and write one decoder layer at a time.

The model is built on the meta device (no memory); the embeddings run once to produce the calibration
hidden states, then each decoder layer is read from the safetensors shards (its routed experts only a
chunk at a time), calibrated, planned, merged and written to the output shards before the next one is
read. Arithmetic is the in-memory path's, on the same float32 values, so the saved weights are
bit-identical to `compress(...).save(...)`.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hcsmoe.apply.layer import install
from hcsmoe.calibration.statistics import LayerStats, Statistics
from hcsmoe.calibration.text import calibration_blocks, model_context
from hcsmoe.checkpoints.architectures import (
    architecture_for,
    decoder_layers,
    expert_count,
    expert_parameters,
    module_name,
    moe_layer_at,
    moe_layers,
)
from hcsmoe.checkpoints.formats import format_of
from hcsmoe.checkpoints.loading import (
    load_config,
    load_tokenizer,
    materialize,
    model_dir,
)
from hcsmoe.checkpoints.saving import atomic_directory, check_output_dir, write_config
from hcsmoe.checkpoints.shards import MemorySource
from hcsmoe.distributed import SINGLE, World
from hcsmoe.errors import Interrupted, UserError
from hcsmoe.fitting.choice import choose_layer_plan
from hcsmoe.fitting.stage import fit_compressed_layer
from hcsmoe.planners.plan import Plan
from hcsmoe.planners.registry import PerLayerChoice, plan_of, plan_with_layers
from hcsmoe.recipe import Recipe
from hcsmoe.result import CompressionResult
from hcsmoe.runners.journal import FOLDER as JOURNAL_FOLDER
from hcsmoe.runners.journal import STATE as JOURNAL_STATE
from hcsmoe.runners.journal import Journal, fingerprint, journaled
from hcsmoe.runners.layerwise import (
    available_memory,
    calibrate_layer,
    expert_chunks,
    original_stream,
    run_dense_streams,
    run_moe_layer,
)
from hcsmoe.runners.progress import LayerEstimate
from hcsmoe.runners.setup import Job, normalizes_top_k, output_dtype_for, prepare, record_size
from hcsmoe.heap import trim_heap
from hcsmoe.runners.streamed_model import StreamingCompressor, release
from hcsmoe.timing import timed

MIN_SHARD_BYTES = 64 * 2**20  # a layer's output is written to disk when it ends, once this much is pending


def token_buffer_bytes(blocks: torch.Tensor, config) -> int:
    """Memory the calibration's per-token buffers take during a layer: hidden states, the MoE block's
    inputs, its routed output and the layer's outputs, float32."""
    return 4 * blocks.numel() * int(config.hidden_size) * 4


def compress_streaming(model_path, out, recipe: Recipe, *, tokenizer=None, stats: Statistics | None = None,
                       plan: Plan | None = None, keep_samples: bool = True, offload_dir=None, overwrite: bool = False,
                       device: str = "cpu", progress: bool = True, world: World = SINGLE,
                       resume: bool = False, journaled_run: bool = True, size: dict | None = None) -> CompressionResult:
    """compress() one decoder layer in memory at a time, each written as it is done (`recipe` resolved). The run
    journals its progress after every layer (unless not `journaled_run`: --size's throw-away probes): `resume`
    continues an interrupted run of the same command (refused in one line for another recipe or checkpoint) and
    writes the same bits as an uninterrupted one. `size`: --size's record of how the shape was chosen, for the
    plan."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(recipe.seed)
    source = model_dir(model_path)
    target = check_output_dir(out, source, overwrite)
    config = load_config(source)
    fmt = format_of(config)
    output_dtype = output_dtype_for(fmt, recipe.dtype, config)
    tokenizer = tokenizer or load_tokenizer(source)
    signature = fingerprint(source, recipe.to_dict(), plan, world.size)
    if recipe.sparsity is not None:
        raise UserError("--sparsity (STUN's unstructured stage) runs in memory: drop --stream (it saves nothing on "
                        "disk: the zeros are stored dense)")
    if resume:  # every rank looks before rank 0 adopts the directory: a refused resume keeps the run
        world.barrier()
        kept = journaled(target)
        if kept:
            Journal(kept[-1], signature).check()
        world.barrier()
    keep = f"{JOURNAL_FOLDER}/{JOURNAL_STATE}" if journaled_run else None
    with resumable_interrupts(target, signature), atomic_directory(target, overwrite, world, resume, keep) as directory:
        journal = Journal(directory, signature, world) if journaled_run else None
        compressor = StreamingCompressor(source, config, architecture_for(config), output_dtype, directory, device,
                                         progress, world)
        meta_layers = moe_layers(compressor.model, compressor.architecture)
        job = prepare(config, meta_layers, recipe, plan, stats, output_dtype, fmt,
                      expert_count(config, compressor.architecture))
        if world.size > job.num_experts:
            raise UserError(f"{world.size} ranks for {job.num_experts} experts per layer: start at most "
                            f"{job.num_experts} processes")
        blocks = None
        if job.needs_calibration(stats):
            blocks = calibration_blocks(tokenizer, recipe.calibration, recipe.blocks, recipe.block_size,
                                        model_context(config, recipe.block_size))
        if offload_dir is None and blocks is not None and token_buffer_bytes(blocks, config) > available_memory() / 4:
            offload_dir = directory / ".token-buffers"
        plan, layer_stats = run_streaming(compressor, job, blocks, stats.layers if stats else None, journal,
                                          keep_samples=keep_samples, offload_dir=Path(offload_dir) if offload_dir else None)
        compressor.writer.finish()
        if world.leader and journal is not None:  # every rank is past the layers (the writer's finish gathered them)
            shutil.rmtree(journal.folder, ignore_errors=True)
        if offload_dir is not None and Path(offload_dir).parent == directory and world.leader:
            shutil.rmtree(offload_dir, ignore_errors=True)
        if blocks is not None:
            info = {"calibration": recipe.calibration, "blocks": list(blocks.shape), "tokens": int(blocks.numel()),
                    "norm_topk_prob": normalizes_top_k(meta_layers), "sequential": recipe.sequential}
            stats = Statistics(layer_stats, job.top_k, info)
        plan.world_size = world.size
        record_size(plan, timings, size)
        timings["total"] = time.perf_counter() - start
        info = job.info(source, plan, timings)
        info["streamed"] = True
        result = CompressionResult(None, tokenizer, plan, stats, job.architecture, source, info, saved=target)
        if world.leader:
            write_config(source, config, job.architecture, job.kept, output_dtype, directory, job.width)
            result.write_extras(directory)
    return result


@contextmanager
def resumable_interrupts(target: Path, signature: str):
    """A run stopped after some layers were journaled (Ctrl-C, SIGTERM, a lost rank, any failure): say how to
    resume (the directory is kept)."""
    try:
        yield
    except (KeyboardInterrupt, Exception) as error:
        kept = journaled(target)
        if not kept:
            raise
        done = Journal(kept[-1], signature).state()["next_layer"]
        advice = (f"{done} decoder layers are done and kept in {kept[-1]}: run the same command with --resume to "
                  "continue from there")
        if isinstance(error, KeyboardInterrupt):
            raise Interrupted(f"interrupted; {advice}") from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(f"{reason}; {advice}") from None


def run_streaming(compressor: StreamingCompressor, job: Job, blocks: torch.Tensor | None,
                  stats_in: list[LayerStats] | None, journal: Journal | None = None, keep_samples: bool = False,
                  offload_dir: Path | None = None) -> tuple[Plan, list[LayerStats]]:
    """The layer loop: stage 1 (unless statistics or a plan make it unnecessary), stages 2-4, then write;
    the journal (if any) records each finished layer, and a journal already there is where the loop resumes.

    Per-token samples (router inputs, output samples) of finished layers are dropped unless `keep_samples`,
    so memory does not grow with the number of layers."""
    model, architecture, recipe, plan_in = compressor.model, compressor.architecture, job.recipe, job.plan
    planner, k, router, refit, router_fit = job.planner, job.kept, recipe.router, recipe.refit, recipe.router_fit
    sequential = recipe.sequential
    layers = decoder_layers(model, architecture)
    inputs = compressor.capture_inputs(blocks, recipe.batch_size, offload_dir) if blocks is not None else None
    original = original_stream(inputs, sequential == "corrective") if inputs is not None else None
    stats_by_layer = {s.layer: s for s in stats_in or []}
    plans_by_layer = {lp.layer: lp for lp in plan_in.layers} if plan_in else {}
    layer_plans, all_stats, first = [], [], 0
    if journal is not None and journal.exists():  # an interrupted run of this command: its finished layers stand
        state = journal.check()
        layer_plans, all_stats, streams = journal.restore(state, compressor.writer)
        if inputs is not None:
            inputs.hidden = streams["hidden"]
        if original is not None:
            original.hidden = streams["original"]
        for layer_plan in layer_plans:
            compressor.keep_layer_plan(layer_plan)
        first = state["next_layer"]
        print(f"hcsmoe: resuming at decoder layer {first} of {len(layers)} (the layers before it are the interrupted "
              "run's)", file=sys.stderr)
    else:
        compressor.write_outside_layers()

    def done(index: int) -> None:
        if journal is not None:
            journal.save(index + 1, compressor.writer, layer_plans, all_stats, job.top_k,
                         inputs and inputs.hidden, original and original.hidden)

    estimate = LayerEstimate(sum(m.index >= first for m in moe_layers(model, architecture)), compressor.progress)
    for index in tqdm(range(first, len(layers)), desc="streaming", unit="layer", disable=not compressor.progress,
                      initial=first, total=len(layers)):
        layer = layers[index]
        moe = moe_layer_at(model, architecture, index)
        if moe is None:
            if inputs is not None:
                materialize(model, layer, compressor.source)
                run_dense_streams(layer, inputs, original, index)
            compressor.write_unchanged(module_name(model, layer), layer)
            release(layer)
            done(index)
            continue
        expert_names = {f"{module_name(model, moe.experts)}.{n}" for n in expert_parameters(moe.experts, moe.num_experts)}
        materialize(model, layer, compressor.source, skip=expert_names)
        moe = moe_layer_at(model, architecture, index)
        stats, block = stats_by_layer.get(index), None
        if inputs is not None:
            stats, outputs, block = calibrate_layer(model, layer, moe, architecture, inputs, compressor.source,
                                                    output_samples=job.output_samples(),
                                                    with_weight_gram=job.with_weight_gram,
                                                    original=original, world=compressor.world)
        if stats is not None:
            all_stats.append(stats)
        fitted = None  # the per-layer choice's fitted winner, when it could be kept
        if index in plans_by_layer:
            layer_plan_of, layer_plan = plan_in, copy.deepcopy(plans_by_layer[index])
        elif isinstance(planner, PerLayerChoice) and block is not None:
            layer_plan_of, layer_plan, fitted = choose_layer_plan(
                planner.candidate_plans(stats, k, router, job.width), compressor.compressed_copy(moe, stats, job.top_k),
                architecture, stats, block, compressor.output_dtype, refit, router_fit,
                world=compressor.world)
        else:
            with timed("plan"):
                layer_plan = planner.plan_layer(stats, k)
            layer_plan_of = plan_of(planner, router, [layer_plan], job.width)
        in_memory = (refit is not None or router_fit is not None or layer_plan_of.merge != "weighted" or sequential
                     or "choice" in layer_plan.details or layer_plan_of.width is not None)
        if fitted is not None:
            install(moe, fitted)
            del fitted
        elif in_memory:  # build the K experts (a group at a time from disk), fit them
            trim_heap()
            compressor.build_compressed(moe, compressor.compressed_prefixes(moe), layer_plan_of, layer_plan, stats,
                                        job.top_k)
            fit_compressed_layer(moe, architecture, layer_plan, stats, block,
                                 compressor.output_dtype, refit, router_fit)
        layer_plans.append(layer_plan)
        if compressor.world.size > 1:
            layer_plan.details["ranks"] = compressor.ownership(moe, layer_plan)
        compressor.keep_layer_plan(layer_plan)
        if in_memory:
            compressor.write_compressed_moe_layer(moe)
        else:  # a weighted merge with nothing to fit: merged and written a few groups at a time
            compressor.write_moe_layer(moe, layer_plan, layer_plan_of.router, stats)
        if inputs is not None and sequential:  # the next layers see this layer compressed (its experts are in memory)
            with timed("calibrate"):
                outputs = run_moe_layer(layer, moe, architecture, inputs, expert_chunks(model, moe, MemorySource(model)))[0]
        if inputs is not None:
            inputs.hidden = outputs
        del block
        release(layer)
        compressor.writer.flush(at_least=MIN_SHARD_BYTES)  # the next layer's fits need the memory more
        estimate.layer_done()
        if stats is not None and not keep_samples:
            all_stats[-1] = dataclasses.replace(stats, router_inputs=torch.zeros(0), sample_outputs=None)
        done(index)
    return plan_with_layers(plan_in, planner, recipe, layer_plans, job.width), all_stats
