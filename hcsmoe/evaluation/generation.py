"""Greedy generation agreement: how many tokens of the original model's greedy continuation of a
validation prompt the compressed model reproduces before its first different token.
"""

from __future__ import annotations

import inspect
import math

import torch

from hcsmoe.errors import UserError
from hcsmoe.evaluation.scoring import context_length

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
