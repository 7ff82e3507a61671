"""Tiny checkpoints quantized the way the released ones are laid out (DeepSeek-V3 / Qwen3 FP8, GPT-OSS MXFP4)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hcsmoe.checkpoints.formats import Fp8Blocks, Mxfp4, Stored
from tests.conftest import make_tiny_model

NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "mlp.router.")  # as the released FP8 checkpoints
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def rewrite(directory: Path, tensors: dict[str, torch.Tensor], quantization: dict) -> Path:
    for path in directory.glob("*.safetensors*"):
        path.unlink()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config.update(quantization_config=quantization, dtype="bfloat16")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def fp8_checkpoint(directory: Path, model_type: str, block: tuple[int, int], seed: int = 0) -> Path:
    """Every Linear weight in float8_e4m3fn with float32 block scales (`weight_scale_inv`), the embeddings,
    norms and routers in bf16, score-correction biases in float32, as DeepSeek-V3 and Qwen3-FP8 ship."""
    make_tiny_model(directory, model_type, seed)
    return rewrite(directory, fp8_tensors(read_all(directory), block), fp8_config(block))


def fp8_config(block: tuple[int, int]) -> dict:
    return dict(FP8_CONFIG, weight_block_size=list(block))


def fp8_tensors(tensors: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors as the released FP8 checkpoints store them (see fp8_checkpoint)."""
    fmt, stored = Fp8Blocks(block), Stored(((), ()), ("F8_E4M3", "F32"))
    encoded = {}
    for key, value in tensors.items():
        if key.endswith(".weight") and value.ndim == 2 and not any(part in key for part in NOT_QUANTIZED):
            encoded.update(fmt.encode(key, value, stored))
        else:
            encoded[key] = value.to(torch.float32 if "e_score_correction_bias" in key else torch.bfloat16)
    return encoded


def mxfp4_checkpoint(directory: Path, seed: int = 0) -> Path:
    """GPT-OSS with its experts' gate_up_proj and down_proj in MXFP4 (`*_blocks`, `*_scales`), everything
    else in bf16. Experts 32 wide so that both projections have whole blocks of 32 inputs."""
    make_tiny_model(directory, "gpt_oss", seed, intermediate_size=32)
    fmt, tensors = Mxfp4(), {}
    for key, value in read_all(directory).items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors.update(fmt.encode(key, value, Stored((), ())))
        else:
            tensors[key] = value.to(torch.bfloat16)
    return rewrite(directory, tensors, MXFP4_CONFIG)
