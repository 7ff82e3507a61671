"""A streaming run's progress, kept in its temporary directory so that a run killed at layer 40 of 48 (out of
memory, a preempted node, Ctrl-C, a lost rank) continues from layer 41 with `--resume` and writes the same bits.

After every decoder layer each process records, each file replaced atomically: the shards it wrote so far and
the tensors still pending for its next shard, the finished layers' plans and statistics, the hidden states the
next layer reads (both streams in corrective mode) and the RNG state. Then the state file (the commit point,
written by rank 0 once every rank kept its part) names the next layer. A resumed run may have another thread
count: the bits do not depend on it (hcsmoe/workers.py). The per-layer arguments (positions,
masks) are recomputed from the calibration blocks, which are deterministic. A run started with other arguments,
on another checkpoint or with another number of ranks is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hcsmoe import __version__
from hcsmoe.calibration.statistics import LayerStats, Statistics
from hcsmoe.checkpoints.saving import leftovers
from hcsmoe.checkpoints.shards import ShardWriter
from hcsmoe.distributed import SINGLE, World
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import LayerPlan, Plan

FOLDER = ".journal"
STATE = "state.json"


def fingerprint(source: Path, recipe: dict, plan: Plan | None, world_size: int) -> str:
    """What must not change between a run and its resumption: the recipe, the checkpoint (config and every
    weight file's name and size), a given plan, hcsmoe's version and the number of ranks."""
    files = sorted((p.name, p.stat().st_size) for p in source.iterdir() if p.suffix in (".safetensors", ".json"))
    payload = {"recipe": recipe, "config": (source / "config.json").read_text(), "files": files,
               "plan": plan.to_dict() if plan is not None else None, "version": __version__, "ranks": world_size}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Journal:
    """The journal of one streaming run, in `directory` (the run's temporary output directory). Under torchrun
    each rank keeps its own part (its shards, pending tensors and streams) in a folder of its own, and rank 0
    commits a layer once every rank has kept its part."""

    def __init__(self, directory: Path, print_: str, world: World = SINGLE):
        self.folder = directory / FOLDER
        self.own = self.folder / f"rank-{world.rank}" if world.size > 1 else self.folder
        self.print, self.world = print_, world

    def exists(self) -> bool:
        return (self.folder / STATE).is_file()

    def state(self) -> dict:
        return json.loads((self.folder / STATE).read_text())

    def check(self) -> dict:
        """The journal's state, refused in one line if it belongs to another run."""
        state = self.state()
        if state["fingerprint"] != self.print:
            raise UserError(f"the interrupted run kept in {self.folder.parent} was made with other arguments or "
                            "another checkpoint; run again without --resume to start over")
        return state

    def save(self, next_layer: int, writer: ShardWriter, layer_plans: list[LayerPlan], stats: list[LayerStats],
             top_k: int, hidden: list[torch.Tensor] | None, original: list[torch.Tensor] | None) -> None:
        """Commit the run's progress up to decoder layer `next_layer` (exclusive): this rank's part, then (once
        every rank kept its own) the state file, replaced atomically: a kill before it leaves the last commit."""
        self.own.mkdir(parents=True, exist_ok=True)
        tensors = {f"pending.{key}": tensor for key, tensor in writer.pending.items()}
        for name, stream in (("hidden", hidden), ("original", original)):
            tensors |= {f"{name}.{b}": h.contiguous() for b, h in enumerate(stream or [])}
        tensors["rng"] = torch.get_rng_state()
        names = part_names(next_layer)
        save_file(tensors, str(self.own / names["tensors"]))
        if stats:
            Statistics(stats, top_k, {}).save(self.own / names["stats"])
        part = {"shards": writer.shards, "written": sorted(writer.written), "pending_bytes": writer.pending_bytes,
                "layer_plans": [asdict(layer_plan) for layer_plan in layer_plans], "with_stats": bool(stats),
                "streams": {"hidden": len(hidden or []), "original": len(original or [])}}
        replace_text(self.own / names["part"], json.dumps(part))
        self.world.barrier()
        if self.world.leader:
            replace_text(self.folder / STATE, json.dumps({"fingerprint": self.print, "next_layer": next_layer}))
        self.world.barrier()
        for old in self.own.iterdir():  # this rank's parts of earlier commits
            if old.name.startswith(PART_PREFIXES) and not old.name.startswith(tuple(names.values())):  # + sidecars
                old.unlink()

    def restore(self, state: dict, writer: ShardWriter) -> tuple[list[LayerPlan], list[LayerStats], dict]:
        """Give `writer` this rank's shards and pending tensors and the RNG its state; returns the finished
        layers' plans and statistics and the saved streams ({"hidden": [...], "original": [...]})."""
        names = part_names(state["next_layer"])
        part = json.loads((self.own / names["part"]).read_text())
        tensors = load_file(str(self.own / names["tensors"]))
        writer.shards = [(keys, size) for keys, size in part["shards"]]
        writer.written = set(part["written"])
        writer.pending = {key.removeprefix("pending."): t for key, t in tensors.items() if key.startswith("pending.")}
        writer.pending_bytes = part["pending_bytes"]
        torch.set_rng_state(tensors["rng"])
        streams = {name: [tensors[f"{name}.{b}"] for b in range(count)] for name, count in part["streams"].items()}
        plans = [LayerPlan.from_dict(entry) for entry in part["layer_plans"]]
        stats = Statistics.load(self.own / names["stats"]).layers if part["with_stats"] else []
        return plans, stats, streams


PART_PREFIXES = ("tensors-", "stats-", "part-")


def part_names(next_layer: int) -> dict[str, str]:
    """The files of one rank's part of the commit up to decoder layer `next_layer` (the statistics file has a
    sidecar, `<name>.json`)."""
    return {"tensors": f"tensors-{next_layer}.safetensors", "stats": f"stats-{next_layer}.safetensors",
            "part": f"part-{next_layer}.json"}


def journaled(out: Path) -> list[Path]:
    """The temporary directories of dead runs for `out` that hold a journal (oldest first): what --resume takes."""
    return [left for left in leftovers(out) if (left / FOLDER / STATE).is_file()]


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temporary file renamed over it)."""
    partial = path.parent / f".{path.name}.partial"
    partial.write_text(text)
    os.replace(partial, path)


