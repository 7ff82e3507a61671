"""A checkpoint that cannot be compressed is refused before any work, in one line naming the file or tensor:
a shard the index names but that is missing, a truncated shard, a tensor whose shape disagrees with the
config, NaN or Inf in a routed expert's weights. A job of hours must not find these at its last layer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from hcsmoe.checkpoints.formats import Plain
from hcsmoe.checkpoints.shards import INDEX_NAME, CheckpointReader, stored_metadata
from hcsmoe.errors import UserError

HEADER_LIMIT = 100 * 2**20  # safetensors' own bound on a header's size


def check_checkpoint(directory: Path, model: nn.Module) -> CheckpointReader:
    """Check the checkpoint `model` (its skeleton, on the meta device) is to be read from; returns its reader."""
    check_shard_files(directory)
    reader = CheckpointReader(directory, model)
    check_shapes(reader, model)
    check_finite_experts(reader)
    return reader


def check_shard_files(directory: Path) -> None:
    """Every shard the index names exists, and every shard holds all the bytes its header promises."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map); restore it from the original model")
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise UserError(f"{index.name} names {missing[0]}, which is not in {directory}"
                            f"{f' (nor {len(missing) - 1} other shards)' if len(missing) > 1 else ''}; "
                            "download the missing shards again")
    for path in sorted(directory.glob("*.safetensors")):
        check_shard(path)


def check_shard(path: Path) -> None:
    """A safetensors file's header parses and its tensors' bytes all lie inside the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length > min(size - 8, HEADER_LIMIT):
                raise ValueError
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"{path} is not a readable safetensors file (bad header); download it again") from None
    if 8 + length + end > size:
        raise UserError(f"{path} is truncated: its header promises {8 + length + end:,} bytes, the file has "
                        f"{size:,}; download it again")


def check_shapes(reader: CheckpointReader, model: nn.Module) -> None:
    """Every model tensor the checkpoint stores has the size the config gives it: a tensor stored as is has
    the parameter's exact shape; one assembled from several (per-expert tensors fused) holds as many values.
    Quantized checkpoints store other shapes (blocks, scales): their tensors are checked as they are decoded."""
    if not isinstance(reader.stored.format, Plain):
        return
    shapes = {key: shape for key, (shape, _) in stored_metadata(reader.stored.file_of).items()}
    for name, tensor in model.state_dict().items():
        source = reader.sources.get(name)
        if source is None:
            continue
        keys = [key for group in source.keys.values() for key in group]
        stored = [shapes[key] for key in keys]
        if source.converter is None and stored[0] != tuple(tensor.shape):
            raise UserError(f"tensor {keys[0]} has shape {list(stored[0])}, the config gives {name} the shape "
                            f"{list(tensor.shape)}; the weights do not belong to this config.json")
        if source.converter is not None and sum(math.prod(s) for s in stored) != tensor.numel():
            raise UserError(f"tensors {keys[0]} ... ({len(keys)} of them) hold {sum(math.prod(s) for s in stored):,} "
                            f"values, the config gives {name} {tensor.numel():,} ({list(tensor.shape)}); the "
                            "weights do not belong to this config.json")


@torch.no_grad()
def check_finite_experts(reader: CheckpointReader) -> None:
    """No routed expert weight holds NaN or Inf (one stored tensor read at a time, decoded to float)."""
    for key in sorted(reader.stored.layout):
        if ".experts." not in key:  # routed experts only (shared experts are named shared_expert(s))
            continue
        tensor = reader.stored.raw(key)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(f"tensor {key} holds {bad:,} NaN or Inf values; the checkpoint is damaged (download it "
                            "again), nothing was compressed")
