"""Stage 5, save: the compressed model with its plan and statistics, saved as an ordinary checkpoint with a
model card (tokenizer, hcsmoe_plan.json, dendrograms beside the weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedModel

from hcsmoe.calibration.statistics import Statistics
from hcsmoe.checkpoints.architectures import Architecture
from hcsmoe.checkpoints.saving import (
    atomic_directory,
    check_output_dir,
    plot_dendrograms,
    save_in_stored_format,
    write_expert_counts,
)
from hcsmoe.errors import UserError
from hcsmoe.planners.plan import Plan


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
    keep_format: bool = False  # save in the source checkpoint's quantized format (the model holds float32)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write an ordinary checkpoint plus plan, dendrograms and model card; atomically."""
        if self.model is None:
            raise UserError(f"this result was streamed and is already saved in {self.saved}")
        target = check_output_dir(out, self.source, overwrite)
        with atomic_directory(target, overwrite) as directory:
            if self.keep_format:
                save_in_stored_format(self.model, self.source, self.plan, directory)
            else:
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


def model_card(result: CompressionResult, has_dendrograms: bool, evaluation: dict | None) -> str:
    """A README saying what this checkpoint is and exactly how it was made."""
    info, plan = result.info, result.plan
    shape = f"{info['experts_before']} to {info['experts_after']} experts per layer"
    if plan.width:
        shape += f" of {plan.width} neurons"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [mixture-of-experts, hcsmoe, expert-merging]",
        "---",
        f"# {info['architecture']} compressed from {shape}",
        "",
        f"Made by hcsmoe {info['hcsmoe_version']} from `{info['source'] or 'an in-memory model'}`.",
        "Loads with plain `transformers`: `AutoModelForCausalLM.from_pretrained(this_directory)`.",
        "",
        "## How",
        f"- method: `{plan.method}` with options `{json.dumps(plan.options)}`; router rows: `{plan.router}`",
        *([f"- shape chosen by --size {plan.size['fraction']}: `{json.dumps(plan.size['grid'])}`"] if plan.size else []),
        f"- calibration: `{json.dumps(result.stats.info) if result.stats else 'plan applied without statistics'}`",
        *([f"- end-to-end stage (--distill-steps): `{json.dumps(plan.distill)}`"] if plan.distill else []),
        f"- top-k routing unchanged ({info['top_k']}); weights saved as {info['dtype']}; seed {info['seed']}",
        "- `hcsmoe_plan.json`: per layer, which original experts form each merged expert, with their routing"
        " frequencies and merge weights (re-apply or edit it with `hcsmoe compress --plan`).",
    ]
    if has_dendrograms:
        lines.append("- `dendrograms.png`: the clustering tree of every layer.")
    if evaluation:
        lines += ["", "## Evaluation", "", "```", evaluation.get("table", ""), "```"]
    return "\n".join(lines) + "\n"
