"""The `self` calibration source: text sampled from the model, alone or joined to other sources with '+'."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from hcsmoe.calibration.text import load_texts, source_parts, token_blocks
from hcsmoe.errors import UserError
from hcsmoe.checkpoints.loading import load_tokenizer
from hcsmoe.calibration.text import calibration_blocks
from hcsmoe.pipeline import compress


def test_source_parts(tmp_path):
    assert source_parts("wiki:en+self") == ["wiki:en", "self"]
    assert source_parts("wiki:en,fr,es") == ["wiki:en,fr,es"]
    named = tmp_path / "a+b.txt"
    named.write_text("text")
    assert source_parts(str(named)) == [str(named)]
    with pytest.raises(UserError):
        source_parts("wiki:en+")


@pytest.fixture(scope="module")
def reference(reference_dir):
    return AutoModelForCausalLM.from_pretrained(reference_dir).eval(), load_tokenizer(reference_dir)


def test_self_blocks_alternate_with_text_are_seeded_and_keep_the_random_state(reference):
    model, tokenizer = reference
    state = torch.get_rng_state()
    blocks = calibration_blocks(tokenizer, "wiki:en+self", 4, 24, 256, model, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert blocks.shape == (4, 24)
    assert torch.equal(blocks[0::2], token_blocks(tokenizer, load_texts("wiki:en"), 24, 2))
    assert torch.equal(blocks, calibration_blocks(tokenizer, "wiki:en+self", 4, 24, 256, model, seed=0))
    assert not torch.equal(blocks[1::2], calibration_blocks(tokenizer, "wiki:en+self", 4, 24, 256, model, seed=1)[1::2])
    assert tokenizer.eos_token_id not in blocks[1::2]  # every sampled block runs its full length


def test_self_blocks_are_what_the_model_writes(reference):
    """Sampled text is likely under the model that wrote it: its per-token loss is near the model's entropy,
    far below that of uniformly random tokens (log of the vocabulary)."""
    model, tokenizer = reference
    sampled = calibration_blocks(tokenizer, "self", 4, 64, 256, model, seed=0)
    random_tokens = torch.randint(len(tokenizer), sampled.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = lambda ids: float(model(input_ids=ids, labels=ids).loss)
        assert loss(sampled) < 0.6 * math.log(len(tokenizer)) < loss(random_tokens)


def test_self_calibration_is_deterministic_end_to_end(tiny_models):
    options = dict(num_experts=4, calibration="wiki:en+self", num_blocks=4, block_size=32, progress=False)
    first, second = compress(tiny_models["qwen3_moe"], **options), compress(tiny_models["qwen3_moe"], **options)
    assert first.plan.to_dict() == second.plan.to_dict()
    a, b = first.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert first.stats.info["calibration"] == "wiki:en+self"


def test_self_needs_the_model():
    with pytest.raises(UserError, match="never holds"):
        calibration_blocks(None, "wiki:en+self", 4, 24, 256)
