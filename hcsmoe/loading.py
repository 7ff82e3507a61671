"""Loading checkpoints with errors a user can act on."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hcsmoe.errors import UserError
from hcsmoe.formats import format_of

REFERENCE_MODEL = Path(__file__).parent / "reference"
QWEN2_REFERENCE_MODEL = Path(__file__).parent / "reference-qwen2-moe"
BUNDLED_MODELS = {"reference": REFERENCE_MODEL, "qwen2-moe": QWEN2_REFERENCE_MODEL}
CAUSAL_LM_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORED = "stored"  # load_model: each tensor in the checkpoint's own dtype


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name} requested but no CUDA GPU is available; use --device cpu")
    return device


def model_dir(path: str | Path | None) -> Path:
    """The checkpoint directory, checked to exist and hold a config.json (None means the bundled model)."""
    directory = Path(path) if path is not None else REFERENCE_MODEL
    if not directory.exists():
        raise UserError(f"model path {directory} does not exist; give a local Hugging Face checkpoint directory")
    if not directory.is_dir() or not (directory / "config.json").is_file():
        raise UserError(f"{directory} is not a model: no config.json there; give a Hugging Face checkpoint directory")
    return directory


def load_config(path: str | Path | None):
    directory = model_dir(path)
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        raise UserError(f"{directory}: cannot read config.json ({str(error).splitlines()[0]})")


def load_tokenizer(path: str | Path | None):
    directory = model_dir(path)
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError, TypeError) as error:
        raise UserError(f"{directory}: no usable tokenizer ({str(error).splitlines()[0]}); save one with the model")


def check_causal_lm(directory: Path, config) -> None:
    """AutoModelForCausalLM also loads encoders (BERT gets an LM head meant for decoder use) and checkpoints of a
    bare model (the LM head would be random), so the saved architecture, or else is_decoder, is checked first."""
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        causal = any(name.endswith(CAUSAL_LM_CLASS_SUFFIXES) for name in architectures)
    else:
        causal = getattr(config, "is_decoder", None) is not False
    if not causal:
        saved_as = f" saved as {', '.join(architectures)}" if architectures else ""
        raise UserError(f"{directory} holds a {type(config).__name__}{saved_as}, not a causal language model")


def load_model(path: str | Path | None, dtype: str = "float32", device: str = "cpu") -> PreTrainedModel:
    """A causal LM from a local directory, in eval mode, on the requested device and dtype.

    `dtype` STORED: every tensor as the checkpoint stores it, read one tensor at a time (each file mapped only
    for its read): one copy of the weights in memory. Quantized checkpoints are always read that way, decoded
    by hcsmoe.formats (any CPU, any block shape, float32 exactly)."""
    directory = model_dir(path)
    config = load_config(directory)
    check_causal_lm(directory, config)
    if dtype == STORED or format_of(config).quantized:
        from hcsmoe.streaming import load_as_stored

        model = load_as_stored(directory, config, device)
        return (model if dtype == STORED else model.to(parse_dtype(dtype))).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=parse_dtype(dtype))
    except ValueError as error:
        first = str(error).splitlines()[0]
        if "Unrecognized configuration class" in first or "AutoModelForCausalLM" in first:
            raise UserError(f"{directory} holds a {type(config).__name__}, not a causal language model")
        raise UserError(f"{directory}: cannot load model ({first})")
    except (OSError, SafetensorError) as error:
        raise UserError(f"{directory}: cannot load weights ({str(error).splitlines()[0]})")
    return model.to(parse_device(device)).eval()
