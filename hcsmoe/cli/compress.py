"""`hcsmoe compress`: its flags (the Recipe's fields, plus where and how to run), and what it prints."""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path

from hcsmoe.errors import UserError

COMPRESS_DEFAULTS = {
    "experts": None,
    "ratio": None,
    "out": None,
    "method": None,
    "linkage": None,
    "metric": None,
    "merge": None,
    "group_size": None,
    "assignment": None,
    "representation": None,
    "max_group_size": None,
    "similarity": None,
    "max_subsets": None,
    "router": "dominant",
    "calibration": "wiki:en,fr,es",
    "blocks": None,
    "block_size": 2048,
    "batch_size": 4,
    "device": "cpu",
    "dtype": None,
    "seed": 0,
    "plan": None,
    "stats": None,
    "save_stats": None,
    "overwrite": False,
    "stream": None,
    "resume": False,
    "offload_dir": None,
    "sequential": None,
    "refit": None,
    "refit_alpha": None,
    "refit_solver": None,
    "refit_steps": None,
    "refit_tokens": None,
    "refit_whiten": None,
    "refit_anchor": None,
    "choose_fitted": None,
    "refit_memory": None,
    "fit_router": None,
    "distill_steps": None,
    "distill_lr": None,
    "fast": None,
    "width": None,
    "sparsity": None,
    "size": None,
    "eval": True,
    "eval_languages": "en,fr,es",
    "eval_tokens": None,
    "dist_timeout": 1800,
    "threads": None,
}


def add_compress_parser(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="merge the experts of an MoE checkpoint and save a smaller one",
        description="Compress MODEL (default: the bundled reference MoE) to half its routed experts' parameters "
                    "(--size 0.5), or to K experts per MoE layer (--experts).",
    )
    p.add_argument("model", nargs="?", help="Hugging Face checkpoint directory (default: bundled reference model)")
    p.add_argument("--config", help="YAML recipe with any of the options below (command-line flags win)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--experts", "-k", type=int, help="experts to keep per MoE layer (K)")
    size.add_argument("--ratio", type=float, help="fraction of experts to remove per layer, in (0, 1)")
    p.add_argument("--out", "-o", help="output directory [./<model>-hcsmoe-size<F> or ./<model>-hcsmoe-<K>e]")
    p.add_argument("--method", help="planner, run as published: hc-smoe, ream, kmeans, m-smoe, f-prune, s-prune, o-prune, "
                                    "reap, ean, stun, random [default: the measured best recipe, see README]")
    p.add_argument("--linkage", help="hierarchical clustering linkage: average (default), single, complete, ward")
    p.add_argument("--metric", help="distance between expert outputs: euclidean (default) or cosine")
    p.add_argument("--merge", help="merge inside a group: frequency, average, fix-dom (ZipIt-style), aligned (Hungarian, "
                                   "REAM), select (the members' neurons that best reproduce their output, least squares) or "
                                   "select-energy (the neurons with the most output energy) [the method's own]")
    p.add_argument("--group-size", type=int, help="ream: most experts per group [16 as published; 2 by default]")
    p.add_argument("--assignment", help="ream: greedy (as published) or nearest (every expert to its nearest centre)")
    p.add_argument("--representation", help="what hc-smoe clusters: expert-output (default), router-logits, weights")
    p.add_argument("--max-group-size", type=int,
                   help="hc-smoe: at most this many experts merged into one (capped agglomerative clustering)")
    p.add_argument("--similarity", help="stun: experts alike by their router rows (router, default) or by how often "
                                         "they are chosen together (co-selection)")
    p.add_argument("--max-subsets", type=int, help="o-prune: most subsets searched per layer [10000]")
    p.add_argument("--router", help="new router rows: dominant (default), average or lsq")
    p.add_argument("--calibration", help="calibration text: wiki:en,fr,es (default), wiki:en, a .txt/.jsonl file, "
                   "a dataset name, or 'self' (text sampled from the model); join sources with '+'. If your own text "
                   "covers one language and the model must keep the others, add '+self' (e.g. my_text.txt+self): "
                   "English alone raised French perplexity up to 1.84x at 50%% removed, English+self 1.07x")
    p.add_argument("--blocks", type=int, help="calibration blocks [enough for 131,072 tokens: 64 of 2048]")
    p.add_argument("--block-size", type=int, help="tokens per block, capped at the model's context [2048]")
    p.add_argument("--batch-size", type=int, help="blocks per forward pass during calibration [4]")
    p.add_argument("--device", help="cpu (default), cuda or cuda:N")
    p.add_argument("--dtype", help="dtype of the saved weights: float32, bfloat16, float16 [the checkpoint's own: "
                                   "FP8 and MXFP4 checkpoints stay in their format]")
    p.add_argument("--seed", type=int, help="seed for every random choice [0]")
    p.add_argument("--plan", help="apply this hcsmoe_plan.json instead of planning")
    p.add_argument("--stats", help="statistics file from --save-stats: re-plan without calibrating")
    p.add_argument("--save-stats", help="write calibration statistics here for later re-planning")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace a non-empty output directory")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="read, compress and write one layer at a time (models larger than memory) [automatic when "
                        "the in-memory path would need more than the free memory]")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the interrupted run of this same command (its finished layers are kept beside --out; "
                        "a different recipe, checkpoint or rank count is refused); streams; under torchrun, the same "
                        "torchrun command with --resume")
    p.add_argument("--offload-dir", help="keep calibration hidden states in memory-mapped files in this directory "
                                          "(automatic with --stream when they would not fit)")
    p.add_argument("--sequential", nargs="?", const="on", choices=("on", "off", "corrective"),
                   help="on: calibrate and fit each layer on the outputs of the already-compressed layers before it; "
                        "corrective: and fit it to the original model's layer output (corrects upstream drift) "
                        "[corrective by default; off for a named --method]")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the down projections so each compressed layer reproduces the original layer's output "
                        "[on by default; off for a named --method unless given]")
    p.add_argument("--refit-alpha", type=float, help="ridge strength of the refit, relative to the mean Gram diagonal [0.01]")
    p.add_argument("--refit-solver", help="joint, blockwise (Gauss-Seidel over experts) or auto [auto]")
    p.add_argument("--width", type=float,
                   help="neurons every routed expert keeps: a fraction of its I in (0, 1] or a count; the checkpoint's "
                        "intermediate width shrinks with it (chosen by least squares, then fitted) [all]")
    p.add_argument("--size", type=float,
                   help="share of the routed experts' parameters to keep, in (0, 1): fewer experts, narrower experts "
                        "or both, the shape chosen by each one's held-out error after the closed-form recipe (a few "
                        "quick compressions first) [0.5 unless --experts, --ratio, --width or --method is given]")
    p.add_argument("--sparsity", type=float,
                   help="STUN's unstructured stage: zero this share of the routed experts' weights (OWL-weighted Wanda), "
                        "in memory; no engine stores MoE sparsity, so it saves nothing on disk or in memory [off]")
    p.add_argument("--fast", action="store_true", default=None,
                   help="the closed-form recipe: the default without the expert fit, several times faster and a little "
                        "worse (for CPU-only runs of large models; see README)")
    p.add_argument("--refit-steps", type=int,
                   help="the expert fit: fit gate/up and down together for this many L-BFGS iterations per layer "
                        "(0: down projections only, as --fast) [30 for the default recipe, 0 for a named method]")
    p.add_argument("--refit-tokens", type=int,
                   help="calibration tokens those iterations use, evenly spaced (0: all) [0]")
    p.add_argument("--refit-whiten", action=argparse.BooleanOptionalAction, default=None,
                   help="take those iterations in whitened coordinates, about as good in 30 steps as 100 plain ones "
                        "(--no-refit-whiten: plain steps) [on]")
    p.add_argument("--refit-anchor", type=float,
                   help="the expert fit's ridge toward the closed-form fits' weights, relative to the fit's curvature "
                        "(1 halves the step along a direction of the layer's mean curvature; more stays nearer --fast) [0]")
    p.add_argument("--refit-memory", type=float, metavar="GIB",
                   help="memory the fits may take: a layer whose whole expert fit needs more is fitted a few experts at "
                        "a time (less of the fit's gain: on the bundled models groups of one expert keep 31-57%%, quarters 79-81%%; one "
                        "Qwen3-30B-shaped layer peaks at about 9 GB with 8, 2.1 GB with 0.5), and the refit keeps its factors "
                        "across sweeps only in half of it (same bits, less time) [8]")
    p.add_argument("--choose-fitted", action=argparse.BooleanOptionalAction, default=None,
                   help="the per-layer choice between merging and pruning scores both after the expert fit (each "
                        "candidate fitted: the expert fit's cost twice) instead of after the closed-form fits [off]")
    p.add_argument("--distill-steps", type=int, metavar="N",
                   help="after every layer's fits, fit all MoE layers' routers and routed experts together to the original "
                        "model's next-token distribution (KL) on the calibration text, N Adam steps of 8 blocks; needs "
                        "the original and the compressed model in memory in float32 (no --stream) and a forward and "
                        "backward pass of both per block: a GPU's work for a large model [off]")
    p.add_argument("--distill-lr", type=float,
                   help="the step size of those Adam steps [1e-4]")
    p.add_argument("--fit-router", action=argparse.BooleanOptionalAction, default=None,
                   help="fit the K router rows to the original routing mass of each group "
                        "[on by default; off for a named --method unless given]")
    p.add_argument("--no-eval", dest="eval", action="store_false", default=None,
                   help="skip the before/after evaluation on the validation text")
    p.add_argument("--eval-languages", help="validation languages to evaluate [en,fr,es]")
    p.add_argument("--eval-tokens", type=int, help="evaluate at most this many tokens per language [all]")
    p.add_argument("--dist-timeout", type=float, help="torchrun: seconds a rank waits for the others before giving up "
                                                       "with an error (a rank that dies stops the rest at once) [1800]")
    p.add_argument("--threads", type=int, help="CPU threads per process [all cores; under torchrun, each rank its share "
                                                "of the node's cores]")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(run=run_compress)


def read_recipe(path: str) -> dict:
    """Options from a YAML recipe; keys are the long option names (dashes or underscores)."""
    from hcsmoe.recipe import read_yaml

    recipe = read_yaml(path)
    unknown = sorted(set(recipe) - set(COMPRESS_DEFAULTS) - {"model"})
    if unknown:
        raise UserError(f"recipe {path}: unknown options {', '.join(unknown)}")
    return recipe


def resolve_options(args: argparse.Namespace) -> dict:
    """Defaults, overridden by the recipe, overridden by flags given on the command line."""
    options = dict(COMPRESS_DEFAULTS, model=None)
    if args.config:
        options.update(read_recipe(args.config))
    options.update({key: value for key, value in vars(args).items() if key in options and value is not None})
    return options


def default_output(model: str | None, k: int, size: float | None = None) -> Path:
    name = Path(model).resolve().name if model else "reference"
    return Path(f"{name}-hcsmoe-{f'size{size:g}' if size else f'{k}e'}")


def resumable(out: Path) -> bool:
    """Whether an interrupted run left its finished layers for `out`; says so in one line when it did not."""
    from hcsmoe.runners.journal import journaled

    if journaled(out.resolve()):
        return True
    print(f"hcsmoe: no interrupted run of {out} to resume: starting from the first layer", file=sys.stderr)
    return False


def stream_choice(source: Path, stream: bool | None, world, recipe) -> bool:
    """A torchrun job always streams (each rank reads its share of every layer's experts from disk); one
    process streams as asked, or when the model and the recipe's expert fit would not fit in memory."""
    if world.size == 1:
        return should_stream(source, stream, fit_memory(source, recipe) if stream is None else 0)
    if stream is False:
        raise UserError("a torchrun job compresses with --stream, one layer at a time: drop --no-stream")
    return True


def run_compress(args: argparse.Namespace) -> int:
    """Join the torchrun job when launched by one (each rank compresses its share), else run as one process."""
    from hcsmoe.distributed import join, leave

    o = resolve_options(args)
    world = join(o["device"], float(o["dist_timeout"]), o["threads"])
    if world.size == 1:  # SIGTERM (a scheduler's stop) as Ctrl-C: a streaming run keeps its journal
        signal.signal(signal.SIGTERM, interrupted)
    try:
        return compress_command(o, world, quiet=args.quiet)
    finally:
        leave(world)


def interrupted(signum, frame):
    raise KeyboardInterrupt


def compress_command(o: dict, world, quiet: bool) -> int:
    """`hcsmoe compress` with resolved options, as one process or as one rank of a torchrun job."""
    from hcsmoe.calibration.statistics import Statistics
    from hcsmoe.checkpoints.architectures import architecture_for, expert_count
    from hcsmoe.checkpoints.loading import load_config, model_dir
    from hcsmoe.checkpoints.saving import check_output_dir
    from hcsmoe.pipeline import compress
    from hcsmoe.planners.plan import Plan
    from hcsmoe.recipe import Recipe

    recipe = Recipe.from_options(o)
    source = model_dir(o["model"])
    config = load_config(source)
    plan = Plan.load(o["plan"]) if o["plan"] else None
    e = expert_count(config, architecture_for(config))
    k = len(plan.layers[0].groups) if plan else recipe.kept(e)
    if k >= e and recipe.width is None:
        raise UserError(f"keeping {k} of {e} experts compresses nothing; choose --experts below {e} or give --width")
    size = recipe.size_to_choose(with_plan=plan is not None, with_stats=bool(o["stats"]))
    out = Path(o["out"]) if o["out"] else default_output(o["model"], k, size)
    check_output_dir(out, source, bool(o["overwrite"]))
    stats = Statistics.load(o["stats"]) if o["stats"] else None
    if o["save_stats"] and Path(o["save_stats"]).exists() and not o["overwrite"]:
        raise UserError(f"statistics file {o['save_stats']} exists; choose another path or pass --overwrite")

    resume = bool(o["resume"]) and world.from_leader(resumable(out) if world.leader else None)
    result = compress(
        source, recipe, stats=stats, plan=plan, resume=resume,
        stream_to=out if resume or stream_choice(source, o["stream"], world, recipe) else None,
        keep_samples=bool(o["save_stats"]), offload_dir=o["offload_dir"], overwrite=bool(o["overwrite"]),
        device=o["device"], progress=not quiet, world=world,
    )
    if not world.leader:  # rank 0 saves the statistics, evaluates and reports
        return 0
    if o["save_stats"] and result.stats is not None:
        result.stats.save(o["save_stats"])
    saved = result.saved or result.save(out, overwrite=bool(o["overwrite"]))
    if o["eval"] and evaluation_fits(source, saved):
        evaluation = evaluate_before_after(source, saved, o)
        result.write_card(saved, evaluation)
        print(evaluation["table"])
    summary = {"out": str(saved), "experts": f"{result.info['experts_before']} -> {result.info['experts_after']}",
               **({"neurons per expert": result.plan.width} if result.plan.width else {}),
               "seconds": result.info["seconds"]}
    print(json.dumps(summary))
    return 0


# Peak memory of the in-memory path over the checkpoint as it holds it (as stored; a quantized one decoded to
# float32), measured on one real Qwen3-30B-A3B-shaped layer, the worst case (a layer's working copies weigh less
# against more layers), with the expert fit in 0.5 GiB: 1.86x for a weighted merge, 2.15x for the default recipe
# at 64 experts and 2.63x for the default itself (--size 0.5, its probes included; `python -m benchmarks.streaming
# in-memory --layers 1 --refit-steps 2 --refit-memory 0.5`). The expert fit's working set beyond that is bounded
# by --refit-memory and counted on top (fit_memory).
IN_MEMORY_FACTOR = 4


def fit_memory(source: Path, recipe) -> int:
    """Bytes the expert fit's working set may take: its budget (--refit-memory), or less where one decoder layer's
    weights fitted whole (every copy L-BFGS keeps, in float32) take less; 0 without the fit."""
    from hcsmoe.checkpoints.loading import load_config
    from hcsmoe.fitting.expert_fit import HISTORY, OVERHEAD_COPIES

    refit = recipe.resolved().refit
    if refit is None or not refit.steps:
        return 0
    layer = float32_bytes(source) / max(1, int(getattr(load_config(source), "num_hidden_layers", 1) or 1))
    return int(min(refit.memory * 2**30, (2 * HISTORY + OVERHEAD_COPIES) * layer))


def should_stream(source: Path, stream: bool | None, fit_bytes: int = 0) -> bool:
    """--stream / --no-stream as given; unset, stream when the in-memory path would not fit comfortably in
    free memory (IN_MEMORY_FACTOR times the checkpoint as held, plus the expert fit's `fit_bytes`), and say so
    on stderr."""
    from hcsmoe.checkpoints.formats import format_of
    from hcsmoe.checkpoints.loading import load_config
    from hcsmoe.checkpoints.shards import safetensors_bytes
    from hcsmoe.runners.streaming import available_memory

    if stream is not None:
        return stream
    fmt = format_of(load_config(source))
    size = int(safetensors_bytes(source) * fmt.expansion * (2 if fmt.quantized else 1))  # quantized: held in float32
    free, need = available_memory(), IN_MEMORY_FACTOR * size + fit_bytes
    if need <= free:
        return False
    decoded = " once decoded to float32" if fmt.quantized else ""
    fit = f" with the expert fit's {fit_bytes / 2**30:.1f} GiB" if fit_bytes else ""
    print(f"hcsmoe: the checkpoint ({size / 2**30:.1f} GiB{decoded}) would need about {need / 2**30:.1f} GiB "
          f"in memory{fit}, {free / 2**30:.1f} GiB are free: streaming it one layer at a time (--no-stream forces "
          "the in-memory path)", file=sys.stderr)
    return True


# Memory of the before/after evaluation over both models' float32 weights (activations, the evaluation's logits).
EVALUATION_FACTOR = 1.25


def float32_bytes(directory: Path) -> int:
    """A checkpoint's weights in float32, from its safetensors headers (MXFP4's packed bytes hold two values)."""
    from hcsmoe.checkpoints.shards import checkpoint_files, stored_metadata

    return sum(4 * math.prod(shape) * (2 if dtype == "U8" else 1)
               for shape, dtype in stored_metadata(checkpoint_files(directory)).values())


def evaluation_fits(source: Path, compressed: Path) -> bool:
    """Whether both models fit in free memory for the before/after evaluation; if not, say in one line that it
    is skipped and how to run it elsewhere (the compressed model is saved: a killed run would hide that)."""
    from hcsmoe.runners.streaming import available_memory

    need, free = EVALUATION_FACTOR * (float32_bytes(source) + float32_bytes(compressed)), available_memory()
    if need <= free:
        return True
    print(f"hcsmoe: saved {compressed}; the before/after evaluation needs about {need / 2**30:.1f} GiB (both models "
          f"in float32), {free / 2**30:.1f} GiB are free: skipped (run `hcsmoe eval {compressed} --reference "
          f"{source}` on a machine with more memory)", file=sys.stderr)
    return False


def evaluate_before_after(source: Path, compressed: Path, options: dict) -> dict:
    """Evaluate the saved compressed checkpoint, as a user would load it, against the original."""
    from hcsmoe.checkpoints.loading import load_model, load_tokenizer
    from hcsmoe.evaluation.evaluate import evaluate, format_table

    languages = tuple(lang.strip() for lang in options["eval_languages"].split(",") if lang.strip())
    tokenizer = load_tokenizer(source)
    original = load_model(source, "float32", options["device"])
    smaller = load_model(compressed, "float32", options["device"])
    after = evaluate(smaller, tokenizer, reference=original, languages=languages, max_tokens=options["eval_tokens"])
    before = after.pop("reference")
    table = format_table([("original", before), (compressed.name, after)])
    return {"before": before, "after": after, "table": table}


