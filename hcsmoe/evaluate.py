"""How good is a (compressed) model: perplexity and bits per byte on held-out text, divergence from the
original model's next-token distributions, and multiple-choice accuracy through lm-evaluation-harness."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from hcsmoe.data import LANGUAGES, load_texts, token_stream, wiki_texts
from hcsmoe.errors import UserError

TASK_DIR = Path(__file__).parent / "lm_eval_tasks"
BUNDLED_TASKS = ("hcsmoe_strategyqa", "hcsmoe_social_iqa")
# Column label and number format of each metric in the terminal table, in display order.
TEXT_COLUMNS = {"ppl": ("ppl", "{:.2f}"), "bpb": ("bpb", "{:.3f}"), "kl": ("KL", "{:.4f}"), "top1": ("top1", "{:.3f}"),
                "gen_prefix": ("gen prefix", "{:.1f}"), "gen_prefix_se": ("± se", "{:.1f}"), "gen_agree": ("gen agree", "{:.3f}")}
TASK_COLUMNS = {"acc": ("acc", "{:.3f}"), "acc_norm": ("acc_norm", "{:.3f}")}
TASK_METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")  # what lm-eval results are kept


# ----------------------------------------------------------------------------- scoring windows


def context_length(model) -> int:
    """The longest sequence the model was built for, the default and the upper bound of the window."""
    length = getattr(model.config, "max_position_embeddings", None)
    if length is None:
        raise UserError(f"{type(model.config).__name__} does not state its context length; give --window")
    return int(length)


def check_window(model, window: int) -> None:
    """Positions past the context are out of distribution (or crash), so longer windows are refused."""
    if window < 2:
        raise UserError(f"window {window} is too short; a window needs at least 2 tokens")
    if window > context_length(model):
        raise UserError(f"window {window} is longer than the model's context; the maximum is {context_length(model)}")


def check_same_vocab(model, reference) -> None:
    """Next-token distributions can only be compared over one shared vocabulary."""
    if model.config.vocab_size != reference.config.vocab_size:
        raise UserError(
            f"the model has a vocabulary of {model.config.vocab_size} tokens and the reference "
            f"{reference.config.vocab_size}; compare only models that share a tokenizer"
        )


def _batches(token_ids: torch.Tensor, window: int, batch_size: int) -> Iterator[torch.Tensor]:
    """The windows stacked batch_size at a time ([B, window]); the shorter last window comes alone."""
    full = token_ids.numel() // window
    for start in range(0, full, batch_size):
        yield token_ids[start * window : min(full, start + batch_size) * window].view(-1, window)
    rest = token_ids[full * window :]
    if rest.numel() >= 2:
        yield rest.unsqueeze(0)


def _next_token_log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """float32 log-probabilities of the token after each position but the last, shape [B, T-1, V]."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return logits.float().log_softmax(dim=-1)


def _nll(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    return -log_probs.gather(-1, targets.unsqueeze(-1)).double().sum().item()


def _score(model, token_ids: torch.Tensor, window: int, batch_size: int, reference=None) -> dict:
    """Summed statistics over all windows in one pass: the model's NLL and, with a reference, the reference's
    NLL, KL(reference || model) and the count of positions whose most likely next token agrees."""
    check_window(model, window)
    if reference is not None:
        check_window(reference, window)
        check_same_vocab(model, reference)
    if token_ids.numel() < 2 or batch_size < 1:
        raise UserError(f"cannot score {token_ids.numel()} tokens in batches of {batch_size} windows; need 2 and 1")
    totals = {"tokens": 0, "nll": 0.0, "reference_nll": 0.0, "kl": 0.0, "agree": 0}
    with torch.inference_mode():
        for batch in _batches(token_ids, window, batch_size):
            batch = batch.to(model.device)
            targets = batch[:, 1:]
            log_q = _next_token_log_probs(model, batch)
            totals["tokens"] += targets.numel()
            totals["nll"] += _nll(log_q, targets)
            if reference is not None:
                log_p = _next_token_log_probs(reference, batch.to(reference.device)).to(log_q.device)
                totals["reference_nll"] += _nll(log_p, targets)
                totals["kl"] += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
                totals["agree"] += (log_q.argmax(-1) == log_p.argmax(-1)).sum().item()
    return totals


def perplexity(model, token_ids: torch.Tensor, window: int, batch_size: int) -> dict:
    """Perplexity over non-overlapping windows, each scored on its own (its first token is context only).
    Returns {"tokens": predicted tokens, "nll": summed natural-log NLL, "ppl": exp(mean NLL)}."""
    totals = _score(model, token_ids, window, batch_size)
    return {"tokens": totals["tokens"], "nll": totals["nll"], "ppl": math.exp(totals["nll"] / totals["tokens"])}


def compare(model, reference, token_ids: torch.Tensor, window: int, batch_size: int) -> dict:
    """How far the model's next-token distributions drift from the reference's, on the same windows as
    perplexity: mean KL(reference || model) in nats per predicted token, and the fraction of positions
    where both models' most likely next token is the same (top-1 agreement)."""
    totals = _score(model, token_ids, window, batch_size, reference)
    return {"tokens": totals["tokens"]} | _drift(totals)


def _drift(totals: dict) -> dict:
    return {"kl": totals["kl"] / totals["tokens"], "top1": totals["agree"] / totals["tokens"]}


def predicted_bytes(tokenizer, token_ids: torch.Tensor, window: int) -> int:
    """UTF-8 size of the text whose tokens were predicted: each window minus its first token, decoded.
    Special tokens (the end-of-text separators between documents) decode to nothing, so their NLL is counted
    and their bytes are not, as for the usual whole-document bits per byte. Exact for byte-level BPE except
    where a window starts inside a multi-byte character, which then decodes as U+FFFD (3 bytes)."""
    return sum(
        len(tokenizer.decode(piece[1:].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False).encode())
        for piece in token_ids.split(window)
    )


def bits_per_byte(nll: float, n_bytes: int) -> float:
    """Summed natural-log NLL as bits per UTF-8 byte: comparable across tokenizers, unlike perplexity."""
    return nll / math.log(2) / n_bytes


# ----------------------------------------------------------------------------- free-running generation

PROMPT_TOKENS = 32
GENERATED_TOKENS = 64


def generation_prompts(tokenizer, documents: list[str], count: int, length: int = PROMPT_TOKENS) -> torch.Tensor:
    """The first `length` tokens of the first `count` documents that have that many: [n <= count, length]."""
    prompts = []
    for document in documents:
        ids = tokenizer(document, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            break
    return torch.tensor(prompts, dtype=torch.long).view(-1, length)


@torch.inference_mode()
def greedy_continuations(model, prompts: torch.Tensor, new_tokens: int = GENERATED_TOKENS,
                         batch_size: int = 32) -> torch.Tensor:
    """Greedy continuations [N, new_tokens] (the most likely token at every step, end-of-text included, so
    every continuation has the same length), computed with the model's key-value cache."""
    window = context_length(model)
    if prompts.shape[1] + new_tokens > window:
        raise UserError(f"a {prompts.shape[1]}-token prompt plus {new_tokens} tokens exceeds the context of {window}")
    # transformers renamed past_key_values to cache (5.2x); use whichever this version's models take
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    outputs = []
    for batch in prompts.split(batch_size):
        batch = batch.to(model.device)
        result = model(input_ids=batch, use_cache=True)
        generated = []
        for _ in range(new_tokens):
            token = result.logits[:, -1].float().argmax(-1, keepdim=True)
            generated.append(token)
            result = model(input_ids=token, use_cache=True, **{name: getattr(result, name)})
        outputs.append(torch.cat(generated, dim=1).cpu())
    return torch.cat(outputs)


def matching_prefix(reference_tokens: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per prompt, how many leading tokens of the continuation match the reference's (0 to its length)."""
    return (reference_tokens == tokens).int().cumprod(dim=1).sum(dim=1)


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of independent values (NaN for fewer than two)."""
    return float(values.double().std() / math.sqrt(len(values))) if len(values) > 1 else math.nan


def generation_agreement(reference_tokens: torch.Tensor, tokens: torch.Tensor) -> dict:
    """How closely free-running generation follows the original: the mean number of leading tokens that
    match, with its standard error over prompts (one prompt's prefix varies from 0 to the whole
    continuation, so a difference between two models means little without it), and the fraction of
    positions whose tokens match."""
    prefix = matching_prefix(reference_tokens, tokens).double()
    return {"gen_prefix": float(prefix.mean()), "gen_prefix_se": standard_error(prefix),
            "gen_agree": float((reference_tokens == tokens).double().mean()), "gen_prompts": len(tokens)}


# ----------------------------------------------------------------------------- multiple choice


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise UserError(f"multiple-choice tasks need lm-evaluation-harness ({error}); install hcsmoe[eval]")
    return lm_eval, HFLM, TaskManager


@lru_cache(maxsize=2)
def _task_manager(with_builtin: bool):
    """The bundled task definitions, plus lm-eval's own (about 10 s to index) only when a task needs them."""
    _, _, TaskManager = _lm_eval()
    return TaskManager(include_path=str(TASK_DIR), include_defaults=with_builtin)


def check_tasks(tasks: Sequence[str]):
    """The lm-eval TaskManager that knows every requested task; an unknown name is a UserError."""
    manager = _task_manager(with_builtin=any(t not in _task_manager(False).all_tasks for t in tasks))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task {unknown[0]!r}; bundled tasks: {', '.join(BUNDLED_TASKS)}, or any lm-eval task")
    return manager


def run_tasks(model, tokenizer, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 8) -> dict:
    """Zero-shot accuracy on lm-eval tasks: the bundled hcsmoe_* tasks read local files; any other name is
    an lm-eval task whose data lm-eval downloads. Returns {task: {"n", "acc", "acc_stderr"[, "acc_norm",
    "acc_norm_stderr"]}} for every task (and group) that reports accuracy."""
    lm_eval, HFLM, _ = _lm_eval()
    manager = check_tasks(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=context_length(model))
    try:
        output = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False, bootstrap_iters=1000
        )
    except OSError as error:  # includes ConnectionError: lm-eval's own tasks download their data
        raise UserError(f"cannot load the data of task(s) {', '.join(tasks)}: {str(error).splitlines()[0]}")
    return {
        name: {"n": output["n-samples"].get(name, {}).get("effective")}
        | {metric: metrics[f"{metric},none"] for metric in TASK_METRICS if f"{metric},none" in metrics}
        for name, metrics in output["results"].items()
        if "acc,none" in metrics
    }


# ----------------------------------------------------------------------------- whole evaluation


def _text_metrics(nll: float, tokens: int, n_bytes: int) -> dict:
    return {"ppl": math.exp(nll / tokens), "bpb": bits_per_byte(nll, n_bytes), "tokens": tokens}


def evaluate(
    model,
    tokenizer,
    *,
    reference=None,
    languages: Sequence[str] = LANGUAGES,
    split: str = "validation",
    texts: Mapping[str, list[str]] | None = None,
    window: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 8,
    tasks: Sequence[str] = (),
    limit: int | None = None,
    generate: int = 0,
    reference_generations: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Perplexity and bits per byte of each bundled language's split (or of `texts`, name -> documents, which
    replaces the languages), optionally cut to max_tokens, in windows of the model's context unless given.
    With a reference model (the uncompressed original) each text also gets KL(reference || model) and top-1
    agreement, and result["reference"] holds the reference's own numbers from the same forward passes;
    `generate` > 0 also continues that many prompts per text greedily with both models (64 tokens after the
    first 32 tokens of a document) and reports how long the continuations agree (gen_prefix, gen_agree);
    texts without a document that long, or a context shorter than 96 tokens, are not generated from.
    `reference_generations` (name -> tokens) reuses the reference's continuations across calls.
    Returns a JSON-able {"languages": {name: {"ppl", "bpb", "tokens"[, "kl", "top1"]}}, "tasks": {...}, "seconds"}."""
    start = time.perf_counter()
    window = window or context_length(model)
    check_window(model, window)
    sources = dict(texts) if texts is not None else {lang: wiki_texts(lang, split) for lang in languages}
    result: dict = {"languages": {}, "tasks": {}}
    original: dict = {"languages": {}, "tasks": {}}
    for name, documents in sources.items():
        token_ids = token_stream(tokenizer, documents)[:max_tokens]
        n_bytes = predicted_bytes(tokenizer, token_ids, window)
        if n_bytes == 0:
            raise UserError(f"text {name!r} is too short to evaluate; give at least a sentence")
        totals = _score(model, token_ids, window, batch_size, reference)
        result["languages"][name] = _text_metrics(totals["nll"], totals["tokens"], n_bytes)
        if reference is not None:
            result["languages"][name] |= _drift(totals)
            original["languages"][name] = _text_metrics(totals["reference_nll"], totals["tokens"], n_bytes)
        prompts = generation_prompts(tokenizer, documents, generate) if generate and reference is not None else None
        if prompts is not None and len(prompts) and PROMPT_TOKENS + GENERATED_TOKENS <= window:
            cache = reference_generations if reference_generations is not None else {}
            if name not in cache or cache[name].shape[0] != prompts.shape[0]:
                cache[name] = greedy_continuations(reference, prompts)
            result["languages"][name] |= generation_agreement(cache[name], greedy_continuations(model, prompts))
    if tasks:
        result["tasks"] = run_tasks(model, tokenizer, tasks, limit=limit, batch_size=batch_size)
        if reference is not None:
            original["tasks"] = run_tasks(reference, tokenizer, tasks, limit=limit, batch_size=batch_size)
    if reference is not None:
        result["reference"] = original
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


# ----------------------------------------------------------------------------- table


def _columns(rows: list[tuple[str, dict]]) -> list[tuple[str, str, str, str]]:
    """(section, kind, metric, label) of every column some row has a value for, in a stable order."""
    columns = []
    for kind, formats in (("languages", TEXT_COLUMNS), ("tasks", TASK_COLUMNS)):
        sections = dict.fromkeys(name for _, result in rows for name in result.get(kind, {}))
        for section in sections:
            for metric, (label, _) in formats.items():
                if any(metric in result.get(kind, {}).get(section, {}) for _, result in rows):
                    columns.append((section, kind, metric, label))
    return columns


def _widths(columns: list[tuple[str, str, str, str]], cells: list[list[str]]) -> list[int]:
    """Each column as wide as its label and values; a section's last column widened to fit the section name."""
    widths = [max(len(label), *(len(row[i]) for row in cells)) for i, (_, _, _, label) in enumerate(columns)]
    for section in dict.fromkeys(column[0] for column in columns):
        members = [i for i, column in enumerate(columns) if column[0] == section]
        span = sum(widths[i] for i in members) + 2 * (len(members) - 1)
        widths[members[-1]] += max(0, len(section) - span)
    return widths


def _cell(result: dict, kind: str, section: str, metric: str) -> str:
    value = result.get(kind, {}).get(section, {}).get(metric)
    return "-" if value is None else (TEXT_COLUMNS | TASK_COLUMNS)[metric][1].format(value)


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Fixed-width table, one row per model (e.g. original and compressed), grouped by language and task."""
    columns = _columns(rows)
    cells = [[_cell(result, kind, section, metric) for section, kind, metric, _ in columns] for _, result in rows]
    widths = _widths(columns, cells)
    name_width = max(len("model"), *(len(name) for name, _ in rows))
    group_line, label_line = " " * name_width, "model".ljust(name_width)
    for i, ((section, _, _, label), width) in enumerate(zip(columns, widths)):
        if i == 0 or columns[i - 1][0] != section:
            span = sum(w + 2 for c, w in zip(columns, widths) if c[0] == section)
            group_line += "  " + section.ljust(span - 2)
        label_line += "  " + label.rjust(width)
    lines = [group_line.rstrip(), label_line]
    for (name, _), row in zip(rows, cells):
        lines.append(name.ljust(name_width) + "".join("  " + cell.rjust(width) for cell, width in zip(row, widths)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


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
    from hcsmoe.loading import load_model, load_tokenizer, model_dir

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
