"""The model as a streaming run holds it: a skeleton on the meta device, a reader of the input shards and a
writer of the output shards; a decoder layer is materialised, compressed and written, then released.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hcsmoe.apply.layer import layer_copy, merged_group, replace_tensor, router_rows, set_count_attributes, weighted_sum
from hcsmoe.apply.narrow import narrowed_expert
from hcsmoe.calibration.statistics import LayerStats, expert_view
from hcsmoe.checkpoints.architectures import (
    Architecture,
    MoELayer,
    decoder_layers,
    expert_parameters,
    expert_width,
    module_name,
    set_width_attributes,
)
from hcsmoe.checkpoints.check import check_checkpoint
from hcsmoe.checkpoints.formats import format_of
from hcsmoe.checkpoints.loading import STORED, materialize, skeleton
from hcsmoe.checkpoints.shards import (
    CheckpointSource,
    FormatEncoder,
    ShardWriter,
    checkpoint_names,
    expert_slots,
    shard_bytes_for,
)
from hcsmoe.distributed import SINGLE, World
from hcsmoe.heap import trim_heap
from hcsmoe.planners.plan import Group, LayerPlan, Plan
from hcsmoe.runners.layerwise import LayerInputs, TokenStore, capture_layer_inputs, outside_layers
from hcsmoe.runners.setup import held_dtype
from hcsmoe.timing import timed

MERGED_CHUNK_BYTES = 64 * 2**20  # merged experts (output dtype) written at once


def release(module: nn.Module) -> None:
    """Drop a module's weights (back to the meta device) once it has been written, and hand the freed memory
    back to the system (heap.py: without this a layer's temporaries stay resident)."""
    module.to("meta")
    trim_heap()


class StreamingCompressor:
    """State of one streaming run: the skeleton, the reader and the writer.

    Under torchrun (`world` of several ranks) rank 0 writes every tensor outside the routed experts, and each
    rank the merged experts it owns (`written_shares`)."""

    def __init__(self, source_dir: Path, config, architecture: Architecture, output_dtype: torch.dtype | None,
                 directory: Path, device: str = "cpu", progress: bool = True, world: World = SINGLE):
        """`output_dtype` None: every tensor in the input's own format (quantized ones re-encoded), else that dtype."""
        self.model = skeleton(config)
        self.architecture = architecture
        self.reader = check_checkpoint(source_dir, self.model)
        self.source = CheckpointSource(self.reader, device)
        self.encoder = FormatEncoder(self.reader.stored) if output_dtype is None else None
        self.output_dtype = output_dtype or torch.float32
        # how the in-memory path would hold the model: as stored when it saves in that dtype, else in float32
        held = held_dtype(format_of(config), output_dtype, config)
        self.held_dtype = self.output_dtype if held == STORED else torch.float32
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

    @timed("write")
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

    @timed("write")
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
            trial = layer_copy(moe)
            self.build_compressed(trial, prefixes, plan, layer_plan, stats, top_k)
            return trial

        return compressed

    def compressed_prefixes(self, moe: MoELayer) -> tuple[str, str]:
        """Where the layer's experts and router are read from (a copy of the layer has no name in the model)."""
        return module_name(self.model, moe.experts), module_name(self.model, moe.router)

    @timed("apply")
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
        narrow = plan.width is not None and plan.width < expert_width(moe.experts, self.architecture)
        if narrow:  # the layer's tensors take the narrower experts' shapes
            one = narrowed_expert({name: value[0] for name, value in layer.items()}, self.architecture,
                                  layer_plan.groups[0], stats, top_k, plan.width, moe.experts)
            layer = {name: torch.zeros((k, *one[name].shape), dtype=self.output_dtype) for name in expert_names}
        for g in self.world.share(k):  # each group written into the layer's tensors: no stacked copy
            group = layer_plan.groups[g]
            merged = self._merged_group(moe, experts_prefix, expert_names, group, plan.merge, stats, top_k)
            if narrow:  # narrowed as the in-memory path narrows: from the merged expert as it holds it
                merged = narrowed_expert(merged, self.architecture, group, stats, top_k, plan.width, moe.experts)
            for name, value in merged.items():
                layer[name][g] = value.to(self.output_dtype)
        for name in expert_names:  # under torchrun each rank merged its share of the groups: every rank gets all
            self.world.copy_rows(layer[name])
        for name in expert_names:
            replace_tensor(moe.experts, name, layer.pop(name))
        for name in router_names:
            rows = router_rows(name, self.source.read(f"{router_prefix}.{name}"), layer_plan.groups, plan.router, stats)
            replace_tensor(moe.router, name, rows)
        if narrow:
            set_width_attributes(moe.experts, plan.width)
            layer_plan.details["width"] = plan.width
        set_count_attributes(moe, len(layer_plan.groups))

    def _merged_group(self, moe: MoELayer, prefix: str, names: list[str], group: Group, merge: str,
                      stats: LayerStats, top_k: int) -> dict[str, torch.Tensor]:
        """One group's merged expert as the in-memory path holds it (the held dtype): weighted merges read
        members one at a time (as _merged), neuron-level merges read the group's members together."""
        if merge == "weighted" or len(group.members) == 1:
            return {name: self._merged(f"{prefix}.{name}", [group], self.held_dtype)[0] for name in names}
        view = expert_view(moe.experts, {name: torch.cat([self.source.read(f"{prefix}.{name}", j, j + 1)
                                                          for j in group.members]) for name in names})
        return {name: value.to(self.held_dtype)
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

    def _merged(self, name: str, groups: list[Group], dtype: torch.dtype | None = None) -> torch.Tensor:
        """Each group's merge in `dtype` (the output dtype by default), its members read one at a time: the
        in-memory path's float32 arithmetic, rounded once to the output dtype as the in-memory path rounds it on
        saving."""
        merged = []
        for group in groups:
            members = (self.source.read(name, j, j + 1)[0] for j in group.members)
            value = next(members) if len(group.members) == 1 else weighted_sum(members, group.weights)
            merged.append(value.to(dtype or self.output_dtype))
        return torch.stack(merged)


