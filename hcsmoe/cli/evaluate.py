"""`hcsmoe eval`: perplexity, bits per byte, drift from an original and task accuracy of a checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from hcsmoe.calibration.text import LANGUAGES, load_texts, wiki_texts
from hcsmoe.errors import UserError
from hcsmoe.evaluation.evaluate import evaluate, format_table
from hcsmoe.evaluation.tasks import BUNDLED_TASKS, check_tasks


def add_eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, bits per byte, drift from the original and task accuracy of a checkpoint",
        description="Evaluate MODEL (default: the bundled reference MoE) on the bundled validation text, "
        "optionally against the original model (--reference) and on multiple-choice tasks (--tasks).",
    )
    p.add_argument("model", nargs="?", help="Hugging Face checkpoint directory (default: bundled reference model)")
    p.add_argument("--reference", metavar="ORIGINAL",
                   help="original checkpoint: adds KL(reference || model) and top-1 agreement")
    p.add_argument("--languages", metavar="LANGS",
                   help=f"bundled validation languages [{','.join(LANGUAGES)}; none with --text]")
    p.add_argument("--text", action="append", metavar="FILE",
                   help="evaluate this .txt (paragraphs) or .jsonl ('text' field) file instead; repeatable")
    p.add_argument("--window", type=_positive, metavar="N", help="tokens per scored window [the model's context]")
    p.add_argument("--max-tokens", type=_positive, metavar="N", help="evaluate at most this many tokens per text [all]")
    p.add_argument("--batch-size", type=_positive, default=8, metavar="N",
                   help="windows (or task requests) per forward pass [8]")
    p.add_argument("--tasks", metavar="TASKS",
                   help=f"comma-separated lm-eval tasks, e.g. {','.join(BUNDLED_TASKS)} (needs hcsmoe[eval])")
    p.add_argument("--limit", type=_positive, metavar="N", help="questions per task, for a quick run [all]")
    p.add_argument("--generate", type=int, default=64, metavar="N",
                   help="with --reference: continue N prompts per text greedily with both models and report how "
                        "long they agree [64; 0 skips]")
    p.add_argument("--json", metavar="OUT.json", help="also write the results to this JSON file")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.set_defaults(run=run_eval)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value!r}")
    return int(value)


def _split_list(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",") if item.strip()]


def _texts_to_evaluate(args: argparse.Namespace) -> dict[str, list[str]]:
    """Documents per name: the chosen bundled languages, then each --text file under its path as given."""
    if args.languages is not None:
        languages = _split_list(args.languages)
    else:
        languages = [] if args.text else list(LANGUAGES)
    texts = {lang: wiki_texts(lang, "validation") for lang in languages}
    for file in args.text or []:
        if not Path(file).is_file():
            raise UserError(f"text file {file} not found; give a .txt or .jsonl file")
        texts[file] = load_texts(file)
    return texts


def _check_output(path: str | None) -> None:
    """Fail before the slow part rather than after it."""
    if path is None:
        return
    if Path(path).is_dir():
        raise UserError(f"--json {path} is a directory; give a file name")
    if not Path(path).resolve().parent.is_dir():
        raise UserError(f"cannot write {path}: directory {Path(path).resolve().parent} does not exist")


def run_eval(args: argparse.Namespace) -> int:
    from hcsmoe.checkpoints.loading import load_model, load_tokenizer, model_dir

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its warnings about passing a model object are noise here
    _check_output(args.json)
    texts = _texts_to_evaluate(args)
    tasks = _split_list(args.tasks)
    if not texts and not tasks:
        raise UserError("nothing to evaluate: give --languages, --text or --tasks")
    if tasks:
        check_tasks(tasks)
    model = load_model(args.model, args.dtype, args.device)
    tokenizer = load_tokenizer(args.model)
    reference = load_model(args.reference, args.dtype, args.device) if args.reference else None
    result = evaluate(
        model, tokenizer, reference=reference, texts=texts, window=args.window, max_tokens=args.max_tokens,
        batch_size=args.batch_size, tasks=tasks, limit=args.limit, generate=args.generate,
    )
    rows = [(model_dir(args.model).name, result)]
    if reference is not None:
        rows.insert(0, (f"{model_dir(args.reference).name} (reference)", result["reference"]))
    print(format_table(rows))
    print(f"({result['seconds']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {args.json}")
    return 0
