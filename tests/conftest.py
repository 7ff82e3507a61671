"""Tiny random checkpoints of every supported architecture, sharing the reference tokenizer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GptOssConfig,
    GraniteMoeConfig,
    GraniteMoeSharedConfig,
    Llama4TextConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.utils import logging

from hcsmoe.checkpoints.architectures import architecture_for, expert_parameters, moe_layers
from hcsmoe.checkpoints.loading import REFERENCE_MODEL

logging.set_verbosity_error()
# The tests run alongside each other's processes: hcsmoe's busy-machine line would add to the stderr they read.
os.environ["HCSMOE_IGNORE_LOAD"] = "1"
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
NARROW = dict(COMMON, intermediate_size=16)  # families whose experts are intermediate_size wide
# 3 layers, the first dense; 2 expert groups, 1 kept per token: valid K are 4, 6 and 8.
DEEPSEEK = dict(
    COMMON, num_hidden_layers=3, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
    n_shared_experts=1, moe_intermediate_size=16, n_group=2, topk_group=1, kv_lora_rank=16, q_lora_rank=None,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
)
TINY_CONFIGS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, head_dim=8, num_experts=8, moe_intermediate_size=16),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=24
    ),
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=8),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=8),
    "deepseek_v2": lambda: DeepseekV2Config(**DEEPSEEK, topk_method="group_limited_greedy"),
    "deepseek_v3": lambda: DeepseekV3Config(**DEEPSEEK),
    "gpt_oss": lambda: GptOssConfig(**NARROW, num_local_experts=8, head_dim=8, sliding_window=16),
    "phimoe": lambda: PhimoeConfig(**COMMON, num_local_experts=8),
    "granitemoe": lambda: GraniteMoeConfig(**NARROW, num_local_experts=8),
    "granitemoeshared": lambda: GraniteMoeSharedConfig(**NARROW, num_local_experts=8, shared_intermediate_size=24),
    # 4 layers, MoE every second one: layers 0 and 2 are dense.
    "llama4_text": lambda: Llama4TextConfig(
        **dict(NARROW, num_hidden_layers=4), intermediate_size_mlp=64, head_dim=8, num_local_experts=8,
        interleave_moe_layer_step=2,
    ),
}
ARCHITECTURES = tuple(TINY_CONFIGS)


def make_tiny_model(directory: Path, model_type: str, seed: int = 0, dtype=torch.float32, **config_changes) -> Path:
    """Save a random tiny model with the reference tokenizer; router rows spread so routing varies, and every
    per-expert bias or score correction (zero at initialisation) random so that merging them is tested."""
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for moe in moe_layers(model, architecture_for(model.config)):
            for tensor in expert_parameters(moe.router, moe.num_experts).values():
                tensor.normal_(0, 0.5 if tensor.ndim == 2 else 0.1)
            for name, tensor in expert_parameters(moe.experts, moe.num_experts).items():
                if "bias" in name:
                    tensor.normal_(0, 0.1)
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
