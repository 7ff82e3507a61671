"""Tiny random checkpoints of every supported architecture, sharing the reference tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig
from transformers.utils import logging

from hcsmoe.loading import REFERENCE_MODEL

logging.set_verbosity_error()
logging.disable_progress_bar()

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
COMMON = dict(
    vocab_size=8192,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)
TINY_CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=8, num_experts=8, moe_intermediate_size=16),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=24
    ),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=8),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=8),
}
ARCHITECTURES = tuple(TINY_CONFIGS)


def make_tiny_model(directory: Path, model_type: str, seed: int = 0, dtype=torch.float32) -> Path:
    """Save a random tiny model with the reference tokenizer; router rows spread so routing varies."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[model_type]())
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.ndim == 2 and param.shape[0] == 8:
                param.normal_(0, 0.5)
    model.to(dtype).save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(REFERENCE_MODEL / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return REFERENCE_MODEL
