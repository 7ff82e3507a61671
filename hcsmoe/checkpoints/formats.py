"""Quantized checkpoint formats as data: how stored tensors become float weights, and back.

The largest MoEs ship quantized: block-scaled FP8 (DeepSeek-V3/R1, Kimi-K2, Qwen3 `-FP8`: a float8_e4m3fn
weight and a float32 `weight_scale_inv` per 128x128 block) or MXFP4 (GPT-OSS experts: `*_blocks` of 32
packed FP4 values sharing a power-of-two `*_scales` exponent). A format maps a checkpoint's stored keys to
the plain keys a model without quantization would have ("logical" keys), decodes those to float32, and
encodes float32 values back into the stored layout. Everything else in the tool sees float weights only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hcsmoe.errors import UserError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # e2m1 magnitudes; bit 3 is the sign
MXFP4_BLOCK = 32
SAFETENSORS_TO_TORCH = {"F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8, "F32": torch.float32,
                        "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64, "BOOL": torch.bool}


@dataclass(frozen=True)
class Stored:
    """What the checkpoint holds for one logical key: its stored keys and their safetensors dtypes."""

    keys: tuple[str, ...]
    dtypes: tuple[str, ...]


class Plain:
    """An unquantized checkpoint: every stored key is a logical key, decoded as stored."""

    name = "plain"
    quantized = False
    description = "not quantized"
    expansion = 1.0  # bytes in bf16 per stored byte: sizes the decoded model in memory

    def layout(self, found: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, Stored]:
        return {key: Stored((key,), (dtype,)) for key, (_, dtype) in found.items()}

    def is_encoded(self, stored: Stored) -> bool:
        return False

    def decode(self, stored: Stored, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0]

    def encode(self, key: str, value: torch.Tensor, stored: Stored) -> dict[str, torch.Tensor]:
        return {key: value}


class Quantized:
    """A quantized format: a logical key is stored as (values, scales), or as is when it is not quantized."""

    quantized = True

    def is_encoded(self, stored: Stored) -> bool:
        return len(stored.keys) == 2

    def decode(self, stored: Stored, parts: list[torch.Tensor]) -> torch.Tensor:
        return parts[0] if len(parts) == 1 else self.decode_pair(*parts)

    def decode_pair(self, values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Fp8Blocks(Quantized):
    """Block-scaled FP8: `X.weight` float8_e4m3fn [.., R, C] with `X.weight_scale_inv` float32
    [.., ceil(R/bR), ceil(C/bC)] (the last block of a dimension that is not a multiple may be partial);
    a fused 3-D tensor `X.name` has its scales in `X.name_scale_inv`. weight = fp8 x scale_inv per block."""

    block: tuple[int, int]
    name = "fp8"
    expansion = 2.0

    @property
    def description(self) -> str:
        return f"fp8 e4m3 in {self.block[0]}x{self.block[1]} blocks (weight_scale_inv)"

    @staticmethod
    def scale_key(key: str) -> str:
        return key[: -len("weight")] + "weight_scale_inv" if key.endswith(".weight") else key + "_scale_inv"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*shape[:-2], math.ceil(shape[-2] / self.block[0]), math.ceil(shape[-1] / self.block[1]))

    def layout(self, found: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, Stored]:
        scales = {self.scale_key(key) for key, (_, dtype) in found.items() if dtype == "F8_E4M3"}
        layout = {}
        for key, (shape, dtype) in found.items():
            if key in scales:
                continue
            if dtype != "F8_E4M3":
                layout[key] = Stored((key,), (dtype,))
                continue
            scale = self.scale_key(key)
            if scale not in found:
                raise UserError(f"{key} is float8 but its scale tensor {scale} is missing; the checkpoint is incomplete")
            scale_shape, scale_dtype = found[scale]
            if len(shape) < 2 or tuple(scale_shape) != self.scale_shape(shape):
                raise UserError(f"{scale} has shape {list(scale_shape)}, but {key} {list(shape)} in blocks of "
                                f"{list(self.block)} needs {list(self.scale_shape(shape))}; the scales do not match")
            layout[key] = Stored((key, scale), (dtype, scale_dtype))
        stray = [key for key in found if key.endswith("_scale_inv") and key not in scales]
        if stray:
            raise UserError(f"{stray[0]} scales no float8 weight (its weight is missing or not float8); "
                            "the checkpoint is inconsistent")
        return layout

    def decode_pair(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return weight.float() * self._expand(scale.float(), weight.shape)

    def _expand(self, scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        rows, cols = shape[-2:]
        grid = scale.repeat_interleave(self.block[0], dim=-2).repeat_interleave(self.block[1], dim=-1)
        return grid[..., :rows, :cols]

    def encode(self, key: str, value: torch.Tensor, stored: Stored) -> dict[str, torch.Tensor]:
        """amax / 448 per block as the scale, the weight divided by it and rounded to float8_e4m3fn."""
        value = value.float()
        rows, cols = value.shape[-2:]
        br, bc = self.block
        padded = torch.nn.functional.pad(value, (0, -cols % bc, 0, -rows % br))
        tiles = padded.reshape(*value.shape[:-2], padded.shape[-2] // br, br, padded.shape[-1] // bc, bc)
        amax = tiles.abs().amax(dim=(-3, -1))
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        weight = (value / self._expand(scale, value.shape)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {key: weight, self.scale_key(key): scale.to(SAFETENSORS_TO_TORCH[stored.dtypes[1]])}


class Mxfp4(Quantized):
    """OCP MXFP4 as GPT-OSS stores its experts: for a model tensor `X.name` [E, in, out], `X.name_blocks`
    uint8 [E, out, in/32, 16] (two e2m1 values per byte, low nibble first) and `X.name_scales` uint8
    [E, out, in/32] (a power-of-two exponent, biased by 127). Values run along the input dimension."""

    name = "mxfp4"
    description = "mxfp4 experts (blocks of 32, power-of-two scales)"
    expansion = 16 / 4.25  # 4 bits per value plus an 8-bit scale per 32

    def layout(self, found: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, Stored]:
        layout = {}
        for key, (shape, dtype) in found.items():
            if key.endswith("_scales") and key[: -len("_scales")] + "_blocks" in found:
                continue
            if not key.endswith("_blocks"):
                if key.endswith("_scales"):
                    raise UserError(f"{key} scales no MXFP4 blocks ({key[:-len('_scales')]}_blocks is missing)")
                layout[key] = Stored((key,), (dtype,))
                continue
            base = key[: -len("_blocks")]
            scales = f"{base}_scales"
            if scales not in found:
                raise UserError(f"{key} is MXFP4 but its scale tensor {scales} is missing; the checkpoint is incomplete")
            scale_shape, scale_dtype = found[scales]
            if dtype != "U8" or len(shape) < 3 or shape[-1] != MXFP4_BLOCK // 2 or tuple(scale_shape) != tuple(shape[:-1]):
                raise UserError(f"{key} {list(shape)} / {scales} {list(scale_shape)}: MXFP4 needs uint8 blocks "
                                f"[..., rows, groups, 16] and scales [..., rows, groups]; the scales do not match")
            layout[base] = Stored((key, scales), (dtype, scale_dtype))
        return layout

    def decode_pair(self, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        lut = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES), dtype=torch.float32)
        values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)
        values = values.reshape(*blocks.shape[:-1], MXFP4_BLOCK)
        exponent = scales.to(torch.int32) - 127
        weight = torch.ldexp(values, exponent.unsqueeze(-1)).flatten(-2)  # [.., out, in]
        return weight.transpose(-1, -2).contiguous()

    def encode(self, key: str, value: torch.Tensor, stored: Stored) -> dict[str, torch.Tensor]:
        """Per block of 32 inputs, the smallest power of two that brings the largest magnitude within 6, each
        value rounded to the nearest e2m1 value."""
        weight = value.float().transpose(-1, -2).contiguous()  # [.., out, in]
        groups = weight.reshape(*weight.shape[:-1], -1, MXFP4_BLOCK)
        amax = groups.abs().amax(-1)
        exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / FP4_VALUES[-1])), torch.zeros_like(amax))
        exponent = exponent.clamp(-127, 127)
        scaled = torch.ldexp(groups, -exponent.to(torch.int32).unsqueeze(-1))
        midpoints = torch.tensor([(a + b) / 2 for a, b in zip(FP4_VALUES, FP4_VALUES[1:])])
        codes = torch.bucketize(scaled.abs(), midpoints) + 8 * (scaled < 0)
        codes = codes.to(torch.uint8).reshape(*groups.shape[:-1], MXFP4_BLOCK // 2, 2)
        blocks = codes[..., 0] | (codes[..., 1] << 4)
        return {f"{key}_blocks": blocks, f"{key}_scales": (exponent + 127).to(torch.uint8)}


Format = Plain | Fp8Blocks | Mxfp4


def quantization_of(config) -> dict | None:
    """The config's quantization_config as a plain dict (transformers may hold it as an object)."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    return quantization if isinstance(quantization, dict) else quantization.to_dict()


def drop_quantization(config) -> None:
    """A config for weights written dequantized: no quantization_config left to mislead a loader."""
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config


def format_of(config) -> Format:
    """The stored format named by config.json's quantization_config, or an error saying what is supported."""
    quantization = quantization_of(config)
    if not quantization:
        return Plain()
    method = quantization.get("quant_method")
    if method == "fp8":
        block = quantization.get("weight_block_size")
        if quantization.get("fmt", "e4m3") != "e4m3" or not block or len(block) != 2:
            raise UserError("only block-scaled FP8 (fmt e4m3, weight_block_size [rows, cols]) is supported; "
                            "dequantize the checkpoint first")
        if quantization.get("activation_scheme", "dynamic") != "dynamic":
            raise UserError("FP8 with static activation scales is not supported; use a dynamic-activation checkpoint")
        return Fp8Blocks((int(block[0]), int(block[1])))
    if method == "mxfp4":
        return Mxfp4()
    raise UserError(f"checkpoints quantized with {method!r} are not supported (supported: block-scaled fp8, mxfp4); "
                    "dequantize it to bf16 first")
