"""How good is a (compressed) model: perplexity and bits per byte on held-out text, divergence from the
original model's next-token distributions, and multiple-choice accuracy through lm-evaluation-harness."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

import torch

from hcsmoe.calibration.text import LANGUAGES, token_stream, wiki_texts
from hcsmoe.errors import UserError
from hcsmoe.evaluation.generation import (
    GENERATED_TOKENS,
    PROMPT_TOKENS,
    generation_agreement,
    generation_prompts,
    greedy_continuations,
)
from hcsmoe.evaluation.scoring import _drift, _score, bits_per_byte, check_window, context_length, predicted_bytes
from hcsmoe.evaluation.tasks import run_tasks

# Column label and number format of each metric in the terminal table, in display order.
TEXT_COLUMNS = {"ppl": ("ppl", "{:.2f}"), "bpb": ("bpb", "{:.3f}"), "kl": ("KL", "{:.4f}"), "top1": ("top1", "{:.3f}"),
                "gen_prefix": ("gen prefix", "{:.1f}"), "gen_prefix_se": ("± se", "{:.1f}"), "gen_agree": ("gen agree", "{:.3f}")}
TASK_COLUMNS = {"acc": ("acc", "{:.3f}"), "acc_norm": ("acc_norm", "{:.3f}")}


# ----------------------------------------------------------------------------- scoring windows


# ----------------------------------------------------------------------------- free-running generation


# ----------------------------------------------------------------------------- multiple choice


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


