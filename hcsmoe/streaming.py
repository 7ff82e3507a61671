"""Compress a checkpoint larger than memory: read, calibrate, merge and write one decoder layer at a time.

The model is built on the meta device (no memory); the embeddings run once to produce the calibration
hidden states, then each decoder layer is read from the safetensors shards (its routed experts only a
chunk at a time), calibrated, planned, merged and written to the output shards before the next one is
read. Arithmetic is the in-memory path's, on the same float32 values, so the saved weights are
bit-identical to `compress(...).save(...)`.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import shutil
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from tqdm.auto import tqdm

from hcsmoe.adapters import (
    Architecture,
    MoELayer,
    architecture_for,
    decoder_layers,
    expert_parameters,
    moe_layer_at,
    set_expert_count,
)
from hcsmoe.apply import (
    install,
    layer_copy,
    merged_group,
    replace_tensor,
    router_rows,
    set_count_attributes,
    weighted_sum,
)
from hcsmoe.calibrate import LayerStats, expert_view
from hcsmoe.checkpoint import (
    CheckpointReader,
    FormatEncoder,
    ShardWriter,
    StoredCheckpoint,
    checkpoint_names,
    safetensors_bytes,
)
from hcsmoe.distributed import SINGLE, World
from hcsmoe.formats import drop_quantization, format_of
from hcsmoe.loading import load_config
from hcsmoe.layerwise import (
    CheckpointSource,
    LayerInputs,
    MemorySource,
    TokenStore,
    calibrate_layer,
    capture_layer_inputs,
    expert_chunks,
    module_name,
    original_stream,
    outside_layers,
    run_dense_streams,
    run_moe_layer,
)
from hcsmoe.plan import Group, LayerPlan, PerLayerChoice, Plan, plan_of, plan_with_layers
from hcsmoe.refit import RefitOptions, choose_layer_plan, fit_compressed_layer, fitting_tokens
from hcsmoe.router_fit import RouterFitOptions

GENERATION_FILES = ("generation_config.json",)
MERGED_CHUNK_BYTES = 64 * 2**20  # merged experts (output dtype) written at once
MIN_SHARD_BYTES = 64 * 2**20  # a layer's output is written to disk when it ends, once this much is pending


def skeleton(config) -> nn.Module:
    """The model with every tensor on the meta device: structure and names, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout, no router jitter


def materialize(model: nn.Module, module: nn.Module, source: CheckpointSource, skip: set[str] = frozenset()) -> None:
    """Give `module` its float32 weights from the checkpoint (except names in `skip`), and recompute
    buffers the checkpoint does not store (rotary frequencies) the way transformers initialises them."""
    prefix = module_name(model, module)
    persistent = set(model.state_dict())
    for sub_name, sub in module.named_modules():
        full = ".".join(p for p in (prefix, sub_name) if p)
        for name, param in list(sub.named_parameters(recurse=False)):
            if f"{full}.{name}" not in skip:
                sub._parameters[name] = nn.Parameter(source.read(f"{full}.{name}"), requires_grad=False)
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is None or buffer.device.type != "meta" or f"{full}.{name}" in skip:
                continue
            if f"{full}.{name}" in persistent and f"{full}.{name}" in source.reader:
                sub._buffers[name] = source.read(f"{full}.{name}")
            else:
                sub.to_empty(device=source.device, recurse=False)
                model._init_weights(sub)
                break


def load_as_stored(directory: Path, config, device: str = "cpu") -> nn.Module:
    """The whole model, each tensor in its stored dtype (quantized ones decoded by our own formats to float32):
    the values the streaming path reads, so in-memory and streaming runs compute on identical weights. Read
    tensor by tensor, each file mapped only for its read: one copy of the weights in memory."""
    model = skeleton(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    materialize(model, model, CheckpointSource(CheckpointReader(directory, model), device, dtype=None), skip=tied)
    if tied:
        model.tie_weights()
    return model


def save_in_stored_format(model: nn.Module, source_dir: Path, plan: Plan, directory: Path) -> None:
    """Write a compressed model held in float32 in its source checkpoint's format: quantized tensors re-encoded
    (copied bit for bit where unchanged), others in their stored dtype, config with its quantization_config."""
    config = load_config(source_dir)
    encoder = FormatEncoder(StoredCheckpoint(source_dir, format_of(config)))
    encoder.slots = {layer_plan.layer: expert_slots(layer_plan) for layer_plan in plan.layers}
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    writer = ShardWriter(directory, shard_bytes_for(source_dir))
    state = {name: tensor for name, tensor in model.state_dict().items() if name not in tied}
    writer.add(encoder.encode(checkpoint_names(model, state)))
    writer.finish()
    write_config(source_dir, config, architecture_for(config), len(plan.layers[0].groups), None, directory)


def release(module: nn.Module) -> None:
    """Drop a module's weights (back to the meta device) once it has been written, and hand the freed memory
    back to the system (glibc keeps freed blocks of up to 32 MB in its heap: without this a layer's
    temporaries stay resident)."""
    module.to("meta")
    trim_heap()


def trim_heap() -> None:
    """Return the heap's free memory to the system (glibc malloc_trim; nothing to do elsewhere)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).malloc_trim(0)


def shard_bytes_for(source_dir: Path) -> int:
    """Output shards of at most about 1/32 of the input checkpoint (64 MiB to 2 GiB): a shard is held in
    memory until written (when full, or when a layer ends), so this bounds the writer's share of peak memory."""
    return min(2 * 2**30, max(64 * 2**20, safetensors_bytes(source_dir) // 32))


class StreamingCompressor:
    """State of one streaming run: the skeleton, the reader and the writer.

    Under torchrun (`world` of several ranks) rank 0 writes every tensor outside the routed experts, and each
    rank the merged experts it owns (`written_shares`)."""

    def __init__(self, source_dir: Path, config, architecture: Architecture, output_dtype: torch.dtype | None,
                 directory: Path, device: str = "cpu", progress: bool = True, world: World = SINGLE):
        """`output_dtype` None: every tensor in the input's own format (quantized ones re-encoded), else that dtype."""
        self.model = skeleton(config)
        self.architecture = architecture
        self.reader = CheckpointReader(source_dir, self.model)
        self.source = CheckpointSource(self.reader, device)
        self.encoder = FormatEncoder(self.reader.stored) if output_dtype is None else None
        self.output_dtype = output_dtype or torch.float32
        self.world = world
        self.writer = ShardWriter(directory, shard_bytes_for(source_dir), world)
        self.progress = progress and world.leader
        self.tied = set(getattr(self.model, "all_tied_weights_keys", {}) or {})

    def write(self, tensors: dict[str, torch.Tensor], first_expert: int = 0) -> None:
        """Tensors in the output dtype, or (keeping the input's format) as they are: the encoder gives each its
        stored format, and an embedding read in bf16 is not copied to float32 on the way."""
        kept = {name: tensor for name, tensor in tensors.items() if name not in self.tied}
        if self.encoder is not None:
            self.writer.add(self.encoder.encode(checkpoint_names(self.model, kept, first_expert)))
            return
        cast = {name: tensor.to(self.output_dtype) for name, tensor in kept.items()}
        self.writer.add(checkpoint_names(self.model, cast, first_expert))

    def keep_layer_plan(self, layer_plan: LayerPlan) -> None:
        """Tell the encoder which input expert each output expert of the layer copies (bit-for-bit candidates)."""
        if self.encoder is not None:
            self.encoder.slots[layer_plan.layer] = expert_slots(layer_plan)

    def write_unchanged(self, prefix: str, module: nn.Module, skip: set[str] = frozenset()) -> None:
        """Every stored tensor of a module, as read (only cast to the output dtype); rank 0's job."""
        if not self.world.leader:
            return
        names = [f"{prefix}.{n}" for n, _ in module.state_dict().items()]
        self.write({n: self.reader.tensor(n) for n in names if n not in skip and n in self.reader})

    def capture_inputs(self, blocks: torch.Tensor, batch_size: int, offload_dir: Path | None) -> LayerInputs:
        parts = outside_layers(self.model, self.architecture)
        for part in parts:
            materialize(self.model, part, self.source)
        inputs = capture_layer_inputs(self.model, self.architecture, blocks, batch_size, TokenStore(offload_dir))
        for part in parts:
            release(part)
        return inputs

    def write_outside_layers(self) -> None:
        if not self.world.leader:
            return
        layers_prefix = module_name(self.model, decoder_layers(self.model, self.architecture))
        names = [n for n in self.model.state_dict() if not n.startswith(layers_prefix + ".")]
        self.write({n: self.reader.tensor(n) for n in names if n in self.reader})

    def write_moe_layer(self, moe: MoELayer, layer_plan: LayerPlan, router: str, stats: LayerStats | None) -> None:
        """Router rows and merged experts of one layer, the experts a few groups at a time."""
        layer_prefix = module_name(self.model, decoder_layers(self.model, self.architecture)[moe.index])
        layer = decoder_layers(self.model, self.architecture)[moe.index]
        router_prefix, experts_prefix = module_name(self.model, moe.router), module_name(self.model, moe.experts)
        e = moe.num_experts
        expert_names = {f"{experts_prefix}.{n}" for n in expert_parameters(moe.experts, e)}
        router_names = {f"{router_prefix}.{n}" for n in expert_parameters(moe.router, e)}
        self.write_unchanged(layer_prefix, layer, skip=expert_names | router_names)
        if self.world.leader:
            self.write({name: router_rows(name.rsplit(".", 1)[1], self.source.read(name), layer_plan.groups, router,
                                          stats) for name in router_names})
        owned = self.written_shares(moe, len(layer_plan.groups))[self.world.rank]
        for part in self._write_chunks(owned, expert_names, experts_prefix):
            self.write({name: self._merged(name, layer_plan.groups[part.start : part.stop]) for name in expert_names},
                       part.start)

    def write_compressed_moe_layer(self, moe: MoELayer) -> None:
        """A layer whose compressed experts and router are in memory (built and fitted): those, and the rest of
        the layer as read."""
        layer = decoder_layers(self.model, self.architecture)[moe.index]
        experts_prefix, router_prefix = self.compressed_prefixes(moe)
        k = moe.num_experts
        experts = {f"{experts_prefix}.{n}": t for n, t in expert_parameters(moe.experts, k).items()}
        router = {f"{router_prefix}.{n}": t for n, t in expert_parameters(moe.router, k).items()}
        self.write_unchanged(module_name(self.model, layer), layer, skip=set(experts) | set(router))
        if self.world.leader:
            self.write(router)
        owned = self.written_shares(moe, k)[self.world.rank]
        for part in self._write_chunks(owned, set(experts), experts_prefix):
            self.write({name: tensor[part.start : part.stop] for name, tensor in experts.items()}, part.start)

    def written_shares(self, moe: MoELayer, k: int) -> list[range]:
        """The output experts of a layer each rank writes: a share of the K, or, where the checkpoint stores a
        layer's experts as one tensor (which cannot be written in pieces), all of them on one rank per layer."""
        if self.stores_per_expert(module_name(self.model, moe.experts)):
            return self.world.shares(k)
        owner = moe.index % self.world.size
        return [range(k) if rank == owner else range(0) for rank in range(self.world.size)]

    def ownership(self, moe: MoELayer, layer_plan: LayerPlan) -> dict:
        """Which rank calibrated which input experts and wrote which output experts of a layer (for the plan)."""
        written = self.written_shares(moe, len(layer_plan.groups))
        return {"experts_read": [[r.start, r.stop] for r in self.world.shares(layer_plan.num_experts)],
                "experts_written": [[r.start, r.stop] for r in written]}

    def stores_per_expert(self, experts_prefix: str) -> bool:
        """Whether the checkpoint keeps one tensor per expert (written a few experts at a time) or fused ones."""
        return all(source.converter is not None for name, source in self.reader.sources.items()
                   if name.startswith(experts_prefix + "."))

    def compressed_copy(self, moe: MoELayer, stats: LayerStats, top_k: int):
        """For the per-layer choice: a function giving a compressed copy of the layer under a candidate plan."""
        prefixes = self.compressed_prefixes(moe)

        def compressed(plan: Plan, layer_plan: LayerPlan) -> MoELayer:
            trim_heap()  # the previous candidate's copy and fits were just freed
            trial = layer_copy(moe)
            self.build_compressed(trial, prefixes, plan, layer_plan, stats, top_k)
            return trial

        return compressed

    def compressed_prefixes(self, moe: MoELayer) -> tuple[str, str]:
        """Where the layer's experts and router are read from (a copy of the layer has no name in the model)."""
        return module_name(self.model, moe.experts), module_name(self.model, moe.router)

    def build_compressed(self, moe: MoELayer, prefixes: tuple[str, str], plan: Plan, layer_plan: LayerPlan,
                         stats: LayerStats, top_k: int) -> None:
        """Give `moe` (the skeleton's layer, or a copy) the plan's K experts in the output dtype and K router rows
        (under torchrun each rank reads and merges its share of the groups, then they exchange them)."""
        experts_prefix, router_prefix = prefixes
        e = layer_plan.num_experts
        expert_names = list(expert_parameters(moe.experts, e))
        router_names = list(expert_parameters(moe.router, e))
        k = len(layer_plan.groups)
        layer = {name: torch.zeros((k, *getattr(moe.experts, name).shape[1:]), dtype=self.output_dtype)
                 for name in expert_names}
        for g in self.world.share(k):  # each group written into the layer's tensors: no stacked copy
            for name, value in self._merged_group(moe, experts_prefix, expert_names, layer_plan.groups[g], plan.merge,
                                                  stats, top_k).items():
                layer[name][g] = value
        for name in expert_names:  # under torchrun each rank merged its share of the groups: every rank gets all
            self.world.copy_rows(layer[name])
        for name in expert_names:
            replace_tensor(moe.experts, name, layer.pop(name))
        for name in router_names:
            rows = router_rows(name, self.source.read(f"{router_prefix}.{name}"), layer_plan.groups, plan.router, stats)
            replace_tensor(moe.router, name, rows)
        set_count_attributes(moe, len(layer_plan.groups))

    def _merged_group(self, moe: MoELayer, prefix: str, names: list[str], group: Group, merge: str,
                      stats: LayerStats, top_k: int) -> dict[str, torch.Tensor]:
        """One group's merged expert in the output dtype: weighted merges read members one at a time (as
        _merged), neuron-level merges read the group's members together."""
        if merge == "weighted" or len(group.members) == 1:
            return {name: self._merged(f"{prefix}.{name}", [group])[0] for name in names}
        view = expert_view(moe.experts, {name: torch.cat([self.source.read(f"{prefix}.{name}", j, j + 1)
                                                          for j in group.members]) for name in names})
        return {name: value.to(self.output_dtype)
                for name, value in merged_group(view, self.architecture, group, merge, stats, top_k).items()}

    def _write_chunks(self, owned: range, expert_names: set[str], experts_prefix: str):
        """The output experts `owned` in pieces written together: 64 MB in the output dtype (the conversion to
        checkpoint names copies what it writes, so a piece, not the layer, is what writing adds to memory), or
        all of them when the checkpoint stores the experts fused (one tensor per layer cannot be written in pieces)."""
        if not owned:
            return
        if not self.stores_per_expert(experts_prefix):
            yield owned
            return
        itemsize = torch.empty(0, dtype=self.output_dtype).element_size()
        per_expert = sum(self.model.get_parameter(n)[0].numel() * itemsize for n in expert_names)
        size = max(1, MERGED_CHUNK_BYTES // max(1, per_expert))
        for first in range(owned.start, owned.stop, size):
            yield range(first, min(owned.stop, first + size))

    def _merged(self, name: str, groups: list[Group]) -> torch.Tensor:
        """Each group's merge in the output dtype, its members read one at a time: the in-memory path's
        float32 arithmetic, rounded once to the output dtype as the in-memory path rounds it on saving."""
        merged = []
        for group in groups:
            members = (self.source.read(name, j, j + 1)[0] for j in group.members)
            value = next(members) if len(group.members) == 1 else weighted_sum(members, group.weights)
            merged.append(value.to(self.output_dtype))
        return torch.stack(merged)


def run_streaming(
    compressor: StreamingCompressor,
    *,
    k: int,
    planner,
    router: str,
    blocks: torch.Tensor | None,
    batch_size: int,
    output_samples: int,
    with_weight_gram: bool,
    stats_in: list[LayerStats] | None,
    plan_in: Plan | None,
    keep_samples: bool = False,
    offload_dir: Path | None = None,
    top_k: int = 0,
    refit: RefitOptions | None = None,
    router_fit: RouterFitOptions | None = None,
    sequential: bool | str = False,
) -> tuple[Plan, list[LayerStats]]:
    """The layer loop: calibrate (unless statistics or a plan make it unnecessary), plan, write.

    Per-token samples (router inputs, output samples) of finished layers are dropped unless `keep_samples`,
    so memory does not grow with the number of layers."""
    model, architecture = compressor.model, compressor.architecture
    layers = decoder_layers(model, architecture)
    inputs = compressor.capture_inputs(blocks, batch_size, offload_dir) if blocks is not None else None
    original = original_stream(inputs, sequential == "corrective") if inputs is not None else None
    compressor.write_outside_layers()
    stats_by_layer = {s.layer: s for s in stats_in or []}
    plans_by_layer = {lp.layer: lp for lp in plan_in.layers} if plan_in else {}
    layer_plans, all_stats = [], []
    for index in tqdm(range(len(layers)), desc="streaming", unit="layer", disable=not compressor.progress):
        layer = layers[index]
        moe = moe_layer_at(model, architecture, index)
        if moe is None:
            if inputs is not None:
                materialize(model, layer, compressor.source)
                run_dense_streams(layer, inputs, original, index)
            compressor.write_unchanged(module_name(model, layer), layer)
            release(layer)
            continue
        expert_names = {f"{module_name(model, moe.experts)}.{n}" for n in expert_parameters(moe.experts, moe.num_experts)}
        materialize(model, layer, compressor.source, skip=expert_names)
        moe = moe_layer_at(model, architecture, index)
        stats, block = stats_by_layer.get(index), None
        if inputs is not None:
            stats, outputs, block = calibrate_layer(model, layer, moe, architecture, inputs, compressor.source,
                                                    output_samples=output_samples, with_weight_gram=with_weight_gram,
                                                    original=original, world=compressor.world)
        if stats is not None:
            all_stats.append(stats)
        fitted = None  # the per-layer choice's fitted winner, when it could be kept
        if index in plans_by_layer:
            layer_plan_of, layer_plan = plan_in, copy.deepcopy(plans_by_layer[index])
        elif isinstance(planner, PerLayerChoice) and block is not None:
            layer_plan_of, layer_plan, fitted = choose_layer_plan(
                planner.candidate_plans(stats, k, router), compressor.compressed_copy(moe, stats, top_k),
                architecture, stats, block, compressor.output_dtype, refit, router_fit, keep_winner=False,
                world=compressor.world)
        else:
            layer_plan = planner.plan_layer(stats, k)
            layer_plan_of = plan_of(planner, router, [layer_plan])
        in_memory = (refit is not None or router_fit is not None or layer_plan_of.merge != "weighted" or sequential
                     or "choice" in layer_plan.details)
        if fitted is not None:
            install(moe, fitted)
            del fitted
        elif in_memory:  # build the K experts (a group at a time from disk), fit them
            trim_heap()
            compressor.build_compressed(moe, compressor.compressed_prefixes(moe), layer_plan_of, layer_plan, stats,
                                        top_k)
            fit_compressed_layer(moe, architecture, layer_plan, stats, fitting_tokens(layer_plan, block),
                                 compressor.output_dtype, refit, router_fit)
        layer_plans.append(layer_plan)
        if compressor.world.size > 1:
            layer_plan.details["ranks"] = compressor.ownership(moe, layer_plan)
        compressor.keep_layer_plan(layer_plan)
        if in_memory:
            compressor.write_compressed_moe_layer(moe)
        else:  # a weighted merge with nothing to fit: merged and written a few groups at a time
            compressor.write_moe_layer(moe, layer_plan, layer_plan_of.router, stats)
        if inputs is not None:  # sequential: the next layers see this layer compressed (its experts are in memory)
            inputs.hidden = (run_moe_layer(layer, moe, architecture, inputs, expert_chunks(model, moe, MemorySource(model)))[0]
                             if sequential else outputs)
        del block
        release(layer)
        compressor.writer.flush(at_least=MIN_SHARD_BYTES)  # the next layer's fits need the memory more
        if stats is not None and not keep_samples:
            all_stats[-1] = dataclasses.replace(stats, router_inputs=torch.zeros(0), sample_outputs=None)
    return plan_with_layers(plan_in, planner, router, layer_plans, refit and refit.to_dict(),
                            router_fit and router_fit.to_dict(), sequential), all_stats


def expert_slots(layer_plan: LayerPlan) -> list[int | None]:
    """Per output expert, the input expert it copies (a group of one), or None for a merge."""
    return [group.members[0] if len(group.members) == 1 else None for group in layer_plan.groups]


def write_config(source_dir: Path, config, architecture: Architecture, k: int, dtype: torch.dtype | None,
                 directory: Path) -> None:
    """config.json with every expert-count key updated, and the generation config as it was. `dtype` None: the
    weights keep the input's format (its quantization_config stays); else they were written dequantized in it."""
    config = copy.deepcopy(config)
    set_expert_count(config, architecture, k)
    if dtype is not None:
        config.dtype = dtype
        drop_quantization(config)
    config.save_pretrained(directory)
    for name in GENERATION_FILES:
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, directory / name)
