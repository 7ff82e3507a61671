"""Scoring held-out text in windows: perplexity, bits per byte, and the drift (KL, top-1 agreement) of a
compressed model's next-token distributions from the original's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from hcsmoe.errors import UserError


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
