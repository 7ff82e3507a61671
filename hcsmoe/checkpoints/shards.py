"""Read a safetensors checkpoint lazily in the model's own parameter names, and write one shard by shard.

Checkpoints on disk often keep one tensor per expert (`experts.3.gate_proj.weight`) while transformers 5
models hold fused 3-D parameters (`experts.gate_up_proj`). We reuse transformers' own conversion table in
both directions, so the streaming path names and lays out every tensor exactly as `from_pretrained` and
`save_pretrained` do, and can read or write a slice of the experts without the rest of the layer.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    MergeModulelist,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

from hcsmoe.checkpoints.formats import SAFETENSORS_TO_TORCH, Format, format_of
from hcsmoe.distributed import SINGLE, World
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import LayerPlan

INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 512 * 2**20  # a pending shard is held in memory until written


def safetensors_bytes(directory: Path) -> int:
    """Bytes of the checkpoint's safetensors files: what streaming reads and what memory is sized against."""
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """Which safetensors file holds each checkpoint key (index file, or every *.safetensors)."""
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / name for key, name in weight_map.items()}
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory} has no safetensors weights; streaming reads .safetensors checkpoints only")
    found = {}
    for path in files:
        with safe_open(str(path), "pt") as handle:
            found.update({key: path for key in handle.keys()})
    return found


def stored_metadata(file_of: dict[str, Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shape and safetensors dtype of every stored tensor, read from the file headers only."""
    found = {}
    for path in sorted(set(file_of.values())):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():
                view = handle.get_slice(key)
                found[key] = (tuple(view.get_shape()), view.get_dtype())
    return {key: found[key] for key in file_of}


class StoredCheckpoint:
    """A checkpoint's tensors by logical key (the names an unquantized checkpoint would use), decoded to float
    on demand from whatever the format stores (fp8 + block scales, MXFP4 blocks + exponents, or plain)."""

    def __init__(self, directory: Path, fmt: Format):
        self.directory = directory
        self.format = fmt
        self.file_of = checkpoint_files(directory)
        self.layout = fmt.layout(stored_metadata(self.file_of))

    def __contains__(self, key: str) -> bool:
        return key in self.layout

    def parts(self, key: str, start: int | None = None, stop: int | None = None) -> list[torch.Tensor]:
        """The stored tensors of a logical key, as stored (rows start:stop of each when given).

        The file is mapped only for this read: pages of a mapping kept open would count as resident
        memory, and a whole checkpoint read through one mapping would end up counted.
        """
        parts = []
        for stored_key in self.layout[key].keys:
            with safe_open(str(self.file_of[stored_key]), "pt") as handle:
                parts.append(handle.get_tensor(stored_key) if start is None else handle.get_slice(stored_key)[start:stop])
        return parts

    def raw(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """One logical tensor (rows start:stop when given): as stored, or decoded to float32 if quantized."""
        return self.format.decode(self.layout[key], self.parts(key, start, stop))


@dataclass
class _Source:
    """The checkpoint keys that make one model parameter, and the conversion that joins them."""

    converter: WeightConverter | None
    keys: dict[str, list[str]] = field(default_factory=dict)  # source pattern (or key) -> keys in expert order


class CheckpointReader:
    """Model parameters read on demand from a checkpoint directory; nothing is loaded up front."""

    def __init__(self, directory: Path, model: nn.Module):
        self.directory = directory
        self.model = model
        self.stored = StoredCheckpoint(directory, format_of(model.config))
        self.sources = self._map_sources(model)

    def _map_sources(self, model: nn.Module) -> dict[str, _Source]:
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        wanted = model.state_dict()
        sources: dict[str, _Source] = {}
        for key in sorted(self.stored.layout, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
            if name not in wanted:
                continue
            source = sources.setdefault(name, _Source(by_pattern[pattern] if pattern else None))
            source.keys.setdefault(pattern or key, []).append(key)
        return sources

    def raw(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        return self.stored.raw(key, start, stop)

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def tensor(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Model parameter `name` (rows start:stop of its leading expert axis when given), in the stored dtype
        (float32 where the checkpoint stores it quantized)."""
        source = self.sources.get(name)
        if source is None:
            raise UserError(f"the checkpoint in {self.directory} has no weights for {name}; is it complete?")
        if source.converter is None:
            (key,) = next(iter(source.keys.values()))
            return self.raw(key, start, stop)
        per_expert = isinstance(source.converter.operations[0], MergeModulelist)
        converter = copy.deepcopy(source.converter)
        for pattern, keys in source.keys.items():
            for key in keys[start:stop] if per_expert and start is not None else keys:
                converter.add_tensor(name, key, pattern, lambda key=key: self.raw(key))
        fused = converter.convert(name, model=self.model, config=self.model.config)[name]
        fused = fused[0] if isinstance(fused, list) else fused
        return fused if per_expert or start is None else fused[start:stop]


def checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor], first_expert: int = 0) -> dict[str, torch.Tensor]:
    """Model-named tensors renamed and split as `save_pretrained` would write them.

    `tensors` may hold experts first_expert.. of a layer only; their per-expert keys are renumbered so
    that a layer can be written a few experts at a time.
    """
    converted = revert_weight_conversion(model, dict(tensors))
    if first_expert == 0:
        return converted
    return {_renumber_expert(key, first_expert): value for key, value in converted.items()}


_EXPERT_INDEX = re.compile(r"(\.experts\.)(\d+)(\.)")


def _renumber_expert(key: str, offset: int) -> str:
    return _EXPERT_INDEX.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}", key, count=1)


def own_memory(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor contiguous and in memory of its own: a pending view of one expert would keep the whole
    layer it was cut from (often a layer already released) alive until its shard is written."""
    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


class ShardWriter:
    """Tensors written to numbered safetensors shards as they come, each shard as soon as it is full.

    Holds at most one shard in memory. `finish` names the files as `save_pretrained` does
    (`model.safetensors`, or `model-0000i-of-0000N.safetensors` plus the index). Under torchrun every rank
    writes its own shards into the one directory; `finish` numbers them all, rank by rank, and rank 0
    writes the index.
    """

    def __init__(self, directory: Path, max_shard_bytes: int | None = None, world: World = SINGLE):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
        self.world = world
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[list[str], int]] = []  # per shard written: its keys and bytes
        self.written: set[str] = set()

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            if key in self.written:
                raise ValueError(f"tensor {key} written twice")
            self.written.add(key)
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self.flush()
            self.pending[key] = own_memory(tensor)
            self.pending_bytes += size

    def flush(self, at_least: int = 0) -> None:
        """Write the pending tensors as one shard (only if they hold `at_least` bytes)."""
        if not self.pending or self.pending_bytes < at_least:
            return
        save_file(self.pending, str(self._shard_path(len(self.shards))), metadata={"format": "pt"})
        self.shards.append((sorted(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def _shard_path(self, number: int) -> Path:
        return self.directory / f".shard-{self.world.rank:05d}-{number:05d}.safetensors"

    def finish(self) -> None:
        self.flush()
        every_rank = self.world.gather(self.shards)
        count = sum(len(shards) for shards in every_rank)
        first = sum(len(shards) for shards in every_rank[: self.world.rank])
        if count == 1:
            if self.shards:
                os.replace(self._shard_path(0), self.directory / "model.safetensors")
            return
        names = [f"model-{number + 1:05d}-of-{count:05d}.safetensors" for number in range(count)]
        for number in range(len(self.shards)):
            os.replace(self._shard_path(number), self.directory / names[first + number])
        if self.world.leader:
            shards = [shard for shards in every_rank for shard in shards]
            weight_map = {key: names[number] for number, (keys, _) in enumerate(shards) for key in keys}
            index = {"metadata": {"total_size": sum(size for _, size in shards)},
                     "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_EXPERT_KEY = re.compile(r"\.layers\.(\d+)\..*\.experts\.(\d+)\.")


class FormatEncoder:
    """Output tensors (checkpoint-named, float) written back in the input checkpoint's stored format.

    A tensor the input stored quantized is copied bit for bit (weight and scales) when its value is exactly the
    input's decoded value: untouched tensors, and experts kept unmerged whose weights nothing refitted (`slots`:
    per MoE layer, the input expert each output expert copies, None for a merge). Every other value of a
    quantized tensor is quantized again in the same format. Unquantized tensors keep their stored dtype."""

    def __init__(self, stored: StoredCheckpoint):
        self.stored = stored
        self.slots: dict[int, list[int | None]] = {}

    def encode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        encoded: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if key not in self.stored:
                raise UserError(f"the output has a tensor {key} that the input checkpoint does not store; "
                                "write it dequantized with --dtype bfloat16")
            layout = self.stored.layout[key]
            if not self.stored.format.is_encoded(layout):
                encoded[key] = value.to(SAFETENSORS_TO_TORCH[layout.dtypes[0]])
            elif value.shape[0] == len(self._slots(key)) and value.ndim >= 3:
                encoded.update(self._fused_experts(key, value))
            else:
                encoded.update(self._one(key, value, self._source_key(key)))
        return encoded

    def _slots(self, key: str) -> list[int | None]:
        layer = _LAYER_INDEX.search(key)
        return self.slots.get(int(layer.group(1)), []) if layer and ".experts." in key else []

    def _source_key(self, key: str) -> str | None:
        """The input key whose stored bits this output key may reuse: itself, or for expert G of a compressed
        layer, the input expert it copies (None for a merged expert)."""
        expert = _EXPERT_KEY.search(key)
        if expert is None or int(expert.group(1)) not in self.slots:
            return key
        member = self.slots[int(expert.group(1))][int(expert.group(2))]
        if member is None:
            return None
        start, stop = expert.span(2)
        return key[:start] + str(member) + key[stop:]

    def _one(self, key: str, value: torch.Tensor, source: str | None, start: int | None = None,
             stop: int | None = None) -> dict[str, torch.Tensor]:
        """The source's stored tensors (rows start:stop), renamed to `key`'s, when they decode exactly to
        `value`; else `value` quantized. The source is read once for both the check and the copy."""
        layout = self.stored.layout[key]
        if source is not None:
            parts = self.stored.parts(source, start, stop)
            if torch.equal(value.float(), self.stored.format.decode(self.stored.layout[source], parts)):
                return dict(zip(layout.keys, parts))
        return self.stored.format.encode(key, value, layout)

    def _fused_experts(self, key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fused [K, ...] expert tensor, one expert at a time: the copied expert's stored slice, or quantized."""
        pieces: dict[str, list[torch.Tensor]] = {}
        for slot, member in enumerate(self._slots(key)):
            piece = (self.stored.format.encode(key, value[slot:slot + 1], self.stored.layout[key]) if member is None
                     else self._one(key, value[slot:slot + 1], key, member, member + 1))
            for name, tensor in piece.items():
                pieces.setdefault(name, []).append(tensor)
        return {name: torch.cat(tensors) for name, tensors in pieces.items()}


class TensorSource:
    """Float32 parameters by model name, optionally only rows start:stop of the leading (expert) axis."""

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        raise NotImplementedError


class MemorySource(TensorSource):
    """The parameters of a model already in memory."""

    def __init__(self, model: nn.Module):
        self.tensors = dict(model.named_parameters()) | dict(model.named_buffers())

    def read(self, name, start=None, stop=None):
        tensor = self.tensors[name].detach()
        return (tensor if start is None else tensor[start:stop]).float()


class CheckpointSource(TensorSource):
    """Parameters read from a safetensors checkpoint on demand, moved to `device` (one layer's worth at a time),
    in float32 (or, `dtype` None, as stored)."""

    def __init__(self, reader: CheckpointReader, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = torch.float32):
        self.reader = reader
        self.device = torch.device(device)
        self.dtype = dtype

    def read(self, name, start=None, stop=None):
        return self.reader.tensor(name, start, stop).to(self.device, self.dtype)


def shard_bytes_for(source_dir: Path) -> int:
    """Output shards of at most about 1/32 of the input checkpoint (64 MiB to 2 GiB): a shard is held in
    memory until written (when full, or when a layer ends), so this bounds the writer's share of peak memory."""
    return min(2 * 2**30, max(64 * 2**20, safetensors_bytes(source_dir) // 32))


def expert_slots(layer_plan: LayerPlan) -> list[int | None]:
    """Per output expert, the input expert it copies (a group of one), or None for a merge."""
    return [group.members[0] if len(group.members) == 1 else None for group in layer_plan.groups]
