"""What a long job tells its user before it costs them: after the first MoE layer, one line on stderr with the
layer's measured stage times, the estimated time of the whole run, and what `--fast` would take."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

from hcsmoe import timing

# Stages the closed-form recipe (--fast) does not run.
FIT_ONLY = ("expert fit",)


def duration(seconds: float) -> str:
    """A duration a person reads at a glance: 45 s, 12 min, 3.4 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(spent: dict[str, float], moe_layers: int) -> str:
    """The estimate after the first of `moe_layers` MoE layers, from its stage times `spent`."""
    layer = sum(spent.values())
    stages = ", ".join(f"{stage} {value:.1f} s" for stage, value in spent.items() if value >= 0.05)
    line = (f"hcsmoe: the first MoE layer took {layer:.1f} s ({stages}): about {duration(layer * moe_layers)} "
            f"for all {moe_layers} MoE layers")
    fitted = sum(spent.get(stage, 0.0) for stage in FIT_ONLY)
    if fitted > 0:
        line += f"; with --fast (no expert fit) about {duration((layer - fitted) * moe_layers)}"
    return line


class LayerEstimate:
    """Counts MoE layers as a runner finishes them and prints the estimate once, after the first."""

    def __init__(self, moe_layers: int, enabled: bool):
        self.moe_layers, self.enabled, self.done = moe_layers, enabled, 0
        self.start = timing.spent()

    def layer_done(self) -> None:
        self.done += 1
        if self.done == 1 and self.enabled and self.moe_layers > 1:
            tqdm.write(estimate_line(timing.since(self.start), self.moe_layers), file=sys.stderr)  # above the bar
