"""Stage 5, save: write the smaller model as an ordinary checkpoint, atomically.

Everything is written to a hidden temporary directory beside the target and renamed into place
only when complete, so an interrupted run never leaves a half-written model under the name asked for.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from hcsmoe.checkpoints.architectures import Architecture, architecture_for, set_expert_count, set_expert_width
from hcsmoe.checkpoints.formats import drop_quantization, format_of
from hcsmoe.checkpoints.loading import load_config
from hcsmoe.checkpoints.shards import (
    FormatEncoder,
    ShardWriter,
    StoredCheckpoint,
    checkpoint_names,
    expert_slots,
    shard_bytes_for,
)
from hcsmoe.distributed import SINGLE, World
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import Plan

# What a write fails with when the disk (or the user's quota, or the process's file size limit) is full.
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def write_errno(error: Exception) -> int | None:
    """The errno of a failed write: an OSError's own, or the one safetensors' writer quotes ("os error 28")."""
    if isinstance(error, OSError):
        return error.errno
    found = re.search(r"os error (\d+)", str(error))
    return int(found.group(1)) if found else None


def check_output_dir(out: str | Path, source: Path | None, overwrite: bool) -> Path:
    """Refuse an output that would clobber data, land inside the input model or cannot be written, before any
    work."""
    out = Path(out).resolve()
    existing = next(p for p in [out, *out.parents] if p.exists())
    if existing != out and (not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK)):
        why = "not a directory" if not existing.is_dir() else "not writable"
        raise UserError(f"cannot create {out}: {existing} is {why}; choose another --out")
    if source is not None:
        source = source.resolve()
        if out == source or source in out.parents:
            raise UserError(f"output {out} is inside the input model {source}; choose a directory outside it")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} exists and is a file; choose another --out")
        if any(out.iterdir()) and not overwrite:
            raise UserError(f"output directory {out} exists and is not empty; choose another --out or pass --overwrite")
    return out


@contextmanager
def atomic_directory(out: Path, overwrite: bool = False, world: World = SINGLE, resume: bool = False,
                     keep: str | None = None):
    """Yield a temporary directory that becomes `out` only if the block finishes.

    Without `overwrite` the final rename refuses a non-empty `out` that appeared meanwhile (another run
    finished first): rename(2) onto a non-empty directory fails, so of two runs with one output exactly one
    succeeds and the other leaves nothing and says so. Under torchrun every rank writes into rank 0's
    temporary directory, and rank 0 renames it once every rank has finished its part.
    Each directory is locked while its run lives. `resume`: take over the temporary directory an interrupted
    run left (one whose lock nobody holds); otherwise such leftovers are removed. `keep` (a file inside the
    directory, e.g. a journal): when the block is interrupted (Ctrl-C, SIGTERM) or fails (a lost rank, any error
    but a full disk) and that file exists, the directory is kept for --resume instead of removed."""
    temporary = world.from_leader(out.parent / f".{out.name}.hcsmoe-partial-{os.getpid()}")
    lock = None
    if world.leader:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            left = leftovers(out)
            if resume and left:
                left[-1].rename(temporary)
                left = left[:-1]
            for stale in left:
                shutil.rmtree(stale, ignore_errors=True)
            if temporary.exists() and not resume:
                shutil.rmtree(temporary)
            if temporary.exists():
                lock = hold_lock(temporary)
            else:  # locked before it can be seen under its name: another run never takes it for a leftover
                starting = out.parent / f".{out.name}.hcsmoe-starting-{os.getpid()}"
                starting.mkdir()
                lock = hold_lock(starting)
                starting.rename(temporary)
        except OSError as error:
            raise UserError(f"cannot write in {out.parent} ({error.strerror}); choose another --out") from None
    world.barrier()
    try:
        yield temporary
        world.barrier()
    except KeyboardInterrupt:
        if keep is None or not (temporary / keep).exists():
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    except (OSError, SafetensorError) as error:
        shutil.rmtree(temporary, ignore_errors=True)
        code = write_errno(error)
        if code not in FULL:
            raise
        raise UserError(f"{os.strerror(code)} while writing into {out.parent}: free space there or choose another "
                        "--out; nothing was written under the requested name") from None
    except BaseException:
        if keep is None or not (temporary / keep).exists():  # a journaled run stays resumable after any failure
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        if lock is not None and not temporary.exists():
            lock.close()
    refusal = _rename_into_place(temporary, out, overwrite) if world.leader else None
    if lock is not None:
        lock.close()
        if refusal is None:
            (out / LOCK).unlink(missing_ok=True)
    refusal = world.from_leader(refusal)
    if refusal:
        raise UserError(refusal)


LOCK = ".lock"


def hold_lock(directory: Path):
    """Lock `directory` for this process's lifetime (released by the OS if it is killed)."""
    handle = open(directory / LOCK, "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def leftovers(out: Path) -> list[Path]:
    """Temporary directories of earlier runs for `out` that no live run holds, oldest first."""
    found = []
    for candidate in sorted(out.parent.glob(f".{out.name}.hcsmoe-partial-*"), key=lambda p: p.stat().st_mtime):
        try:
            with open(candidate / LOCK, "a") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: its run is gone
        except BlockingIOError:
            continue  # a live run's
        except OSError:
            pass  # no lock file: a run from before locks, or one killed while starting
        found.append(candidate)
    return found


def _rename_into_place(temporary: Path, out: Path, overwrite: bool) -> str | None:
    """Rename the finished directory to `out`; the reason it could not (and nothing kept), or None."""
    if overwrite and out.exists():
        retired = out.parent / f".{out.name}.hcsmoe-old-{os.getpid()}"
        out.rename(retired)
        temporary.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
        return None
    try:
        temporary.rename(out)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        return (f"output {out} was written by another run while this one worked; nothing of this run "
                "was kept: choose another --out, or pass --overwrite to replace it")
    return None


def write_expert_counts(directory: Path, keys: tuple[str, ...], count: int) -> None:
    """Write every expert-count key the family's config classes read (old and new transformers)."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key in keys:
        config[key] = count
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_trees(plan):
    """(title, linkage matrix, groups kept) for every tree in a plan: one per layer, or one per routing
    group where the layer was planned group by group (DeepSeek)."""
    for lp in plan.layers:
        if lp.details.get("linkage_matrix"):
            yield f"layer {lp.layer}", lp.details["linkage_matrix"], len(lp.groups)
        blocks = lp.details.get("routing_groups", [])
        for number, block in enumerate(blocks):
            if block["details"].get("linkage_matrix"):
                yield (f"layer {lp.layer}, routing group {number}", block["details"]["linkage_matrix"],
                       len(lp.groups) // len(blocks))


def plot_dendrograms(plan, path: Path) -> bool:
    """One figure with the merge tree of every layer; False when the method builds no tree."""
    trees = list(merge_trees(plan))
    if not trees:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.cluster.hierarchy import dendrogram

    columns = min(4, len(trees))
    rows = (len(trees) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, tree, k) in zip(axes.flat, trees):
        tree = np.asarray(tree)
        n = tree.shape[0] + 1
        cut = tree[n - k - 1, 2] if k < n else 0.0  # height of the last merge that was made
        dendrogram(tree, ax=ax, color_threshold=cut + 1e-12, leaf_font_size=6)
        ax.set_title(f"{title}: {n} -> {k} experts", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(trees):]:
        ax.axis("off")
    figure.suptitle(f"{plan.method} ({plan.options.get('linkage', '')} linkage): merges below each colour cut", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


GENERATION_FILES = ("generation_config.json",)


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


def write_config(source_dir: Path, config, architecture: Architecture, k: int, dtype: torch.dtype | None,
                 directory: Path, width: int | None = None) -> None:
    """config.json with every expert-count key updated, and the generation config as it was. `dtype` None: the
    weights keep the input's format (its quantization_config stays); else they were written dequantized in it."""
    config = copy.deepcopy(config)
    set_expert_count(config, architecture, k)
    if width is not None:
        set_expert_width(config, architecture, width)
    if dtype is not None:
        config.dtype = dtype
        drop_quantization(config)
    config.save_pretrained(directory)
    for name in GENERATION_FILES:
        if (source_dir / name).is_file():
            shutil.copy(source_dir / name, directory / name)
