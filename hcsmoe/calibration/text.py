"""Text sources: the bundled Wikipedia corpora, user files, and token blocks cut from them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from torch import nn

from hcsmoe.calibration.sampling import SELF_SOURCE, sampled_blocks
from hcsmoe.errors import UserError

CORPUS_DIR = Path(__file__).parents[1] / "corpora"
LANGUAGES = ("en", "fr", "es")
SPLITS = ("train", "validation")


def wiki_path(lang: str, split: str) -> Path:
    """Path of a bundled Wikipedia lead-section file (gzipped JSON Lines)."""
    if lang not in LANGUAGES or split not in SPLITS:
        raise UserError(f"no bundled corpus for language {lang!r} split {split!r}; languages: {', '.join(LANGUAGES)}")
    return CORPUS_DIR / "wiki-vital" / f"wiki-vital.{lang}.{split}.jsonl.gz"


def wiki_texts(lang: str, split: str) -> list[str]:
    """Article texts of one bundled language and split, in file order."""
    with gzip.open(wiki_path(lang, split), "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def interleave(collections: list[list[str]]) -> list[str]:
    """Round-robin over several languages, so that any prefix of the result mixes them evenly."""
    mixed = []
    for index in range(max(len(c) for c in collections)):
        mixed.extend(c[index] for c in collections if index < len(c))
    return mixed


def _jsonl_texts(lines: list[str], where: str) -> list[str]:
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{where}: line {number} is not valid JSON; expected one object with a 'text' field per line")
        if isinstance(record, dict) and "text" in record:
            texts.append(str(record["text"]))
        elif not (isinstance(record, dict) and "canary" in record):
            raise UserError(f"{where}: line {number} has no 'text' field; expected one object with a 'text' field per line")
    return texts


def _hub_dataset_texts(name: str, split: str = "train") -> list[str]:
    try:
        import datasets  # optional: only for Hugging Face dataset names
    except ImportError:
        raise UserError(f"{name!r} is not a file; to use a Hugging Face dataset name install the 'datasets' package")
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # network, unknown name, ...
        raise UserError(f"could not load dataset {name!r}: {str(error).splitlines()[0]}")
    if "text" not in dataset.column_names:
        raise UserError(f"dataset {name!r} has no 'text' column (columns: {', '.join(dataset.column_names)})")
    return [str(t) for t in dataset["text"]]


def source_parts(source: str) -> list[str]:
    """A calibration source's parts: 'wiki:en+self' -> ['wiki:en', 'self'] (an existing file is one part)."""
    if Path(source).exists():
        return [source]
    parts = [part.strip() for part in source.split("+")]
    if not all(parts):
        raise UserError(f"calibration source {source!r} has an empty part; join sources with '+', e.g. wiki:en+self")
    return parts


def load_texts(source: str) -> list[str]:
    """Texts from a source: 'wiki:LANG[,LANG...]' (bundled train text), a .txt, a .jsonl(.gz), or a dataset name."""
    if source.startswith("wiki:"):
        return interleave([wiki_texts(lang.strip(), "train") for lang in source[5:].split(",")])
    path = Path(source)
    if path.is_dir():
        raise UserError(f"calibration source {source} is a directory; give a .txt or .jsonl file")
    if path.exists():
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            content = f.read()
        if ".jsonl" in path.suffixes:
            texts = _jsonl_texts(content.splitlines(), source)
        else:
            texts = [p for p in content.split("\n\n") if p.strip()]
        if not texts:
            raise UserError(f"{source} contains no text")
        return texts
    if source.endswith((".txt", ".jsonl", ".gz")) or "/" not in source:
        raise UserError(f"calibration text {source} not found; give a .txt or .jsonl file or 'wiki:en'")
    return _hub_dataset_texts(source)


def token_stream(tokenizer, texts: list[str], limit: int | None = None) -> torch.Tensor:
    """Texts tokenized and joined with the end-of-text token, as one 1-D tensor (stops once past `limit`)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if limit is not None and len(ids) >= limit:
            break
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(tokenizer, texts: list[str], block_size: int, num_blocks: int, source: str = "text") -> torch.Tensor:
    """The first num_blocks non-overlapping blocks of block_size tokens, shape [num_blocks, block_size]."""
    stream = token_stream(tokenizer, texts, limit=block_size * num_blocks)
    available = stream.numel() // block_size
    if available < 1:
        raise UserError(
            f"{source} has {stream.numel()} tokens, shorter than one calibration block of {block_size}; give more text"
        )
    count = min(num_blocks, available)
    return stream[: count * block_size].view(count, block_size)


# Calibration tokens when --blocks is not given (64 blocks of 2048, or 512 of the reference model's 256): the
# fits keep improving up to here; twice 65,536 won every held-out row (benchmarks/results/levers-*.md).
CALIBRATION_TOKENS = 131072


def model_context(config, block_size: int) -> int:
    """The longest block the model takes: its max_position_embeddings (block_size where the config has none)."""
    return int(getattr(config, "max_position_embeddings", block_size))


def calibration_blocks(tokenizer, source: str, num_blocks: int | None, block_size: int, context: int,
                       model: nn.Module | None = None, seed: int = 0) -> torch.Tensor:
    """num_blocks blocks of min(block_size, context) tokens; None: enough blocks for CALIBRATION_TOKENS.
    A source of several parts joined by '+' (`wiki:en+self`) takes its blocks from each part in turn; the
    `self` part is sampled from `model` (which must then be given: it runs the whole model)."""
    length = min(block_size, context)
    if num_blocks is None:
        num_blocks = -(-CALIBRATION_TOKENS // max(length, 1))
    if num_blocks <= 0 or block_size <= 1:
        raise UserError("calibration needs at least one block of at least two tokens")
    parts = source_parts(source)
    if SELF_SOURCE in parts and model is None:
        raise UserError("calibration 'self' samples text from the whole model, which a streaming run (--stream, "
                        "torchrun, or a model too large for memory) never holds: run with --no-stream, or sample "
                        "text with your own serving stack and pass it as a .txt file")
    counts = [num_blocks // len(parts) + (i < num_blocks % len(parts)) for i in range(len(parts))]
    blocks = [sampled_blocks(model, tokenizer, count, length, seed) if part == SELF_SOURCE
              else token_blocks(tokenizer, load_texts(part), length, count, part)
              for part, count in zip(parts, counts) if count]
    return torch.stack(interleave([list(b) for b in blocks]))
