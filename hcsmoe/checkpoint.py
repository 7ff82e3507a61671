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

from hcsmoe.errors import UserError

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
        self.file_of = checkpoint_files(directory)
        self.sources = self._map_sources(model)

    def _map_sources(self, model: nn.Module) -> dict[str, _Source]:
        conversions = get_model_conversion_mapping(model)
        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        wanted = model.state_dict()
        sources: dict[str, _Source] = {}
        for key in sorted(self.file_of, key=dot_natural_key):
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, wanted)
            if name not in wanted:
                continue
            source = sources.setdefault(name, _Source(by_pattern[pattern] if pattern else None))
            source.keys.setdefault(pattern or key, []).append(key)
        return sources

    def raw(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """One checkpoint tensor as stored (rows start:stop when given).

        The file is mapped only for this read: pages of a mapping kept open would count as resident
        memory, and a whole checkpoint read through one mapping would end up counted.
        """
        with safe_open(str(self.file_of[key]), "pt") as handle:
            if start is None:
                return handle.get_tensor(key)
            return handle.get_slice(key)[start:stop]

    def __contains__(self, name: str) -> bool:
        return name in self.sources

    def tensor(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Model parameter `name` (rows start:stop of its leading expert axis when given), in the stored dtype."""
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


class ShardWriter:
    """Tensors written to numbered safetensors shards as they come, each shard as soon as it is full.

    Holds at most one shard in memory. `finish` names the files as `save_pretrained` does
    (`model.safetensors`, or `model-0000i-of-0000N.safetensors` plus the index).
    """

    def __init__(self, directory: Path, max_shard_bytes: int | None = None):
        self.directory = directory
        self.max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.written: set[str] = set()
        self.total_bytes = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            if key in self.written:
                raise ValueError(f"tensor {key} written twice")
            self.written.add(key)
            size = tensor.numel() * tensor.element_size()
            if self.pending and self.pending_bytes + size > self.max_shard_bytes:
                self.flush()
            self.pending[key] = tensor.contiguous()
            self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self._shard_path(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def _shard_path(self, number: int) -> Path:
        return self.directory / f".shard-{number:05d}.safetensors"

    def finish(self) -> None:
        self.flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self._shard_path(0), self.directory / "model.safetensors")
            return
        weight_map = {}
        for number, keys in enumerate(self.shards):
            name = f"model-{number + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._shard_path(number), self.directory / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
