"""Loading checkpoints with errors a user can act on."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from hcsmoe.checkpoints.architectures import module_name
from hcsmoe.checkpoints.formats import format_of
from hcsmoe.checkpoints.shards import CheckpointReader, CheckpointSource
from hcsmoe.errors import UserError

REFERENCE_MODEL = Path(__file__).parents[1] / "reference"
QWEN2_REFERENCE_MODEL = Path(__file__).parents[1] / "reference-qwen2-moe"
DEEPSEEK_REFERENCE_MODEL = Path(__file__).parents[1] / "reference-deepseek-v3"
BUNDLED_MODELS = {"reference": REFERENCE_MODEL, "qwen2-moe": QWEN2_REFERENCE_MODEL, "deepseek-v3": DEEPSEEK_REFERENCE_MODEL}
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
    by hcsmoe.checkpoints.formats (any CPU, any block shape, float32 exactly)."""
    directory = model_dir(path)
    config = load_config(directory)
    check_causal_lm(directory, config)
    if dtype == STORED or format_of(config).quantized:
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


def skeleton(config) -> nn.Module:
    """The model with every tensor on the meta device: structure and names, no memory."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()  # eval: no dropout, no router jitter


def materialize(model: nn.Module, module: nn.Module, source: CheckpointSource, skip: set[str] = frozenset()) -> None:
    """Give `module` its float32 weights from the checkpoint (except names in `skip`), and recompute
    buffers the checkpoint does not store (rotary frequencies) the way transformers initialises them."""
    prefix = module_name(model, module)
    persistent = set(model.state_dict())
    for sub_name, sub in module.named_modules():
        full = ".".join(p for p in (prefix, sub_name) if p)
        for name, param in list(sub.named_parameters(recurse=False)):
            if f"{full}.{name}" not in skip:
                sub._parameters[name] = nn.Parameter(source.read(f"{full}.{name}"), requires_grad=False)
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is None or buffer.device.type != "meta" or f"{full}.{name}" in skip:
                continue
            if f"{full}.{name}" in persistent and f"{full}.{name}" in source.reader:
                sub._buffers[name] = source.read(f"{full}.{name}")
            else:
                sub.to_empty(device=source.device, recurse=False)
                model._init_weights(sub)
                break


def load_as_stored(directory: Path, config, device: str = "cpu") -> nn.Module:
    """The whole model, each tensor in its stored dtype (quantized ones decoded by our own formats to float32):
    the values the streaming path reads, so in-memory and streaming runs compute on identical weights. Read
    tensor by tensor, each file mapped only for its read: one copy of the weights in memory."""
    model = skeleton(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    materialize(model, model, CheckpointSource(CheckpointReader(directory, model), device, dtype=None), skip=tied)
    if tied:
        model.tie_weights()
    return model


@contextmanager
def in_float32(*modules: nn.Module, keep: nn.Module | None = None):
    """Compute with modules held in a narrower dtype (a bf16 model in memory) in float32: their floating
    parameters and buffers are upcast on entry (exactly) and put back on exit; parameters created meanwhile
    (a compressed layer's experts) are rounded to the dtype the module's parameters were held in, as saving
    would round them. `keep` (the routed experts) stays as held: its readers upcast a chunk or a group at a
    time. The arithmetic is the float32 model's, bit for bit, at the cost of one layer's other weights."""
    kept = {id(tensor) for tensor in keep.parameters()} if keep is not None else set()
    held, known = {}, set()
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) in known:  # tied: seen through another module
                continue
            known.add(id(tensor))
            if tensor.is_floating_point() and tensor.dtype != torch.float32 and id(tensor) not in kept:
                held[id(tensor)] = (tensor, tensor.dtype)
                tensor.data = tensor.data.float()
    if not held:
        yield
        return
    narrow = next(dtype for _, dtype in held.values())  # the dtype the model is held in
    try:
        yield
    finally:
        for module in modules:
            for tensor in module.parameters():
                if tensor.is_floating_point() and id(tensor) not in known:
                    tensor.data = tensor.data.to(narrow)
        for tensor, dtype in held.values():
            tensor.data = tensor.data.to(dtype)
