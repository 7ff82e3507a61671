"""Calibration text sampled from the model itself (the `self` source).

A user's calibration text covers what the user thought of (English, say); the experts that serve everything
else (other languages, code) then look unused and are the first to go. Text the model writes itself, from
random first tokens, covers what the model does in about the proportions it does it, with no data at all:
`--calibration wiki:en+self` keeps French and Spanish on the bundled models where `wiki:en` alone loses
them (benchmarks/results/calibration-text.md). Sampling runs the whole model, so it needs it in memory.
"""

from __future__ import annotations

import torch
from torch import nn

SELF_SOURCE = "self"
SAMPLING_BATCH = 16


def ordinary_token_ids(tokenizer) -> torch.Tensor:
    """Every token id of the vocabulary except the special ones (end of text, padding, ...)."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in special], dtype=torch.long)


@torch.no_grad()
def sampled_blocks(model: nn.Module, tokenizer, num_blocks: int, length: int, seed: int) -> torch.Tensor:
    """[num_blocks, length] tokens: a uniformly drawn first token, then length - 1 tokens sampled from the
    model's own next-token distribution (temperature 1, no truncation, end of text never chosen so every
    block is full). Seeded and deterministic; the global random state is left as it was."""
    starts = ordinary_token_ids(tokenizer)
    starts = starts[torch.randint(len(starts), (num_blocks, 1), generator=torch.Generator().manual_seed(seed))]
    device = next(model.parameters()).device
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else int(starts[0])
    blocks = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in starts.split(SAMPLING_BATCH):
            batch = batch.to(device)
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=length - 1, min_new_tokens=length - 1,
                                 pad_token_id=pad)
            blocks.append(out.cpu())
    return torch.cat(blocks)
