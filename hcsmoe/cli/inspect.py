"""`hcsmoe inspect`: a checkpoint's MoE layout (family, experts, routing, shared parts, valid K), read from its
config and tensor names only.
"""

from __future__ import annotations

import argparse
import json


def add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="show the MoE layout of a checkpoint", description="Show MODEL's MoE layout.")
    p.add_argument("model", nargs="?", help="Hugging Face checkpoint directory (default: bundled reference model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(run=run_inspect)


def describe(model_path: str | None) -> dict:
    """Architecture, expert layout, routing, shared parts and size, read from config and weights only."""
    from hcsmoe.checkpoints.architectures import architecture_for, dense_layers, expert_count, moe_layers, top_k
    from hcsmoe.checkpoints.formats import format_of
    from hcsmoe.checkpoints.loading import load_config, model_dir

    source = model_dir(model_path)
    config = load_config(source)
    architecture = architecture_for(config)
    skeleton = meta_skeleton(config)
    weight_files = sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin"))
    return {
        "path": str(source),
        "architecture": architecture.name,
        "model_type": config.model_type,
        "layers": config.num_hidden_layers,
        "moe_layers": [m.index for m in moe_layers(skeleton, architecture)],
        "dense_layers": dense_layers(skeleton, architecture),
        "experts_per_layer": expert_count(config, architecture),
        "top_k": top_k(config, architecture),
        "routing": routing_summary(config, architecture),
        "valid_k": valid_k_summary(config, architecture),
        "expert_count_keys": list(architecture.count_keys),
        **expert_layout(skeleton, architecture),
        "hidden_size": config.hidden_size,
        "dtype": str(getattr(config, "dtype", None) or "unknown").removeprefix("torch."),
        "format": format_of(config).description,
        "size_bytes": sum(f.stat().st_size for f in weight_files),
    }


def meta_skeleton(config):
    """The model built on the meta device: its module tree and shapes, without reading or allocating weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


ROUTING_SUMMARIES = {
    "softmax": "the router's own top-k; experts scored by a softmax over all of them",
    "sigmoid": "top-k of sigmoid scores plus e_score_correction_bias; experts scored by sigmoid",
    "llama4": "top-k logits, each chosen expert's input scaled by the sigmoid of its logit",
}


def routing_summary(config, architecture) -> str:
    """How the family scores and picks experts, including a group limit that restricts K."""
    from hcsmoe.checkpoints.architectures import group_limits

    summary = f"{architecture.routing}: {ROUTING_SUMMARIES[architecture.routing]}"
    limits = group_limits(config, architecture)
    if limits is not None:
        summary += f"; group-limited: each token picks {limits[1]} of {limits[0]} expert groups"
    return summary


def valid_k_summary(config, architecture) -> str:
    """The expert counts compress accepts for this model (a group limit allows only some)."""
    from hcsmoe.checkpoints.architectures import group_limits, valid_expert_counts

    valid = valid_expert_counts(config, architecture)
    if group_limits(config, architecture) is None:
        return f"{valid[0]} to {valid[-1]}"
    return ", ".join(map(str, valid))


def expert_layout(skeleton, architecture) -> dict:
    """Where the routed experts, router and shared parts were found, with every per-expert tensor's shape
    (from the first MoE layer; paths relative to a decoder layer)."""
    from hcsmoe.checkpoints.architectures import moe_layers, shared_modules

    moe = moe_layers(skeleton, architecture)[0]
    prefix = f"{architecture.moe_block}."
    experts = {f"{prefix}{architecture.experts}.{n}": list(t.shape)
               for n, t in [*moe.experts.named_parameters(recurse=False), *moe.experts.named_buffers(recurse=False)]}
    router = {f"{prefix}{architecture.router}.{n}": list(t.shape)
              for n, t in [*moe.router.named_parameters(recurse=False), *moe.router.named_buffers(recurse=False)]}
    gate_up = "[E, H, 2I] (transposed)" if architecture.transposed else "[E, 2I, H]"
    order = "interleaved g0, u0, g1, u1, ..." if architecture.gate_up_interleaved else "concatenated [gate; up]"
    found = shared_modules(skeleton, architecture)
    shared = [path for path in architecture.shared if any(name.endswith(f".{path}") for name in found)]
    return {
        "expert_layout": f"gate_up_proj {gate_up}, {order}; activation {architecture.activation}",
        "expert_tensors": experts,
        "router_tensors": router,
        "shared_modules": shared,
    }


def run_inspect(args: argparse.Namespace) -> int:
    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for key, value in info.items():
        if key == "size_bytes":
            value = f"{value / 2**20:.1f} MiB on disk"
        elif key == "moe_layers":
            value = f"{len(value)} of {info['layers']}: {value}"
        elif isinstance(value, dict):
            value = "".join(f"\n{'':>22}{name} {shape}" for name, shape in value.items())
        print(f"{key.replace('_', ' '):>20}: {value}")
    return 0
