"""Run the calibration text through the model one decoder layer at a time.

The hidden states of every calibration block are kept between layers; each decoder layer runs on them
with the per-layer arguments (position embeddings, masks) the model itself computed. In an MoE layer
the routed experts are not run by the model: their inputs are captured, every expert's statistics and
the layer's routed output come from one chunked pass over all tokens (`calibrate.expert_pass`), and
the output is replayed into the layer. Weights come from a `TensorSource`: the loaded model, or a
checkpoint read lazily from disk, so a model larger than memory is calibrated a layer at a time, and
both give the same numbers bit for bit.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hcsmoe.calibration.statistics import (
    BlockTokens,
    ExpertChunk,
    LayerAccumulator,
    LayerStats,
    add_slots,
    expert_pass,
    expert_view,
    experts_per_chunk,
    route_tokens,
    weight_gram,
)
from hcsmoe.checkpoints.architectures import (
    Architecture,
    MoELayer,
    decoder_layers,
    expert_parameters,
    module_name,
    moe_layer_at,
    moe_layers,
)
from hcsmoe.checkpoints.loading import in_float32
from hcsmoe.checkpoints.shards import MemorySource, TensorSource
from hcsmoe.distributed import SINGLE, World
from hcsmoe.timing import timed
from hcsmoe.workers import parallel_map, workers

CHUNK_BYTES = 128 * 2**20  # float32 expert weights held at once


def expert_chunks(model: nn.Module, moe: MoELayer, source: TensorSource, budget: int = CHUNK_BYTES,
                  experts: range | None = None) -> Callable[[], Iterator[ExpertChunk]]:
    """A re-iterable series of (first expert, view holding a few experts' float32 weights), over all experts
    or only `experts` (an expert-parallel rank's share)."""
    prefix = module_name(model, moe.experts)
    e = moe.num_experts
    experts = experts if experts is not None else range(e)
    names = list(expert_parameters(moe.experts, e))
    size = experts_per_chunk(moe.experts, e, budget)

    def chunks() -> Iterator[ExpertChunk]:
        for first in range(experts.start, experts.stop, size):
            stop = min(experts.stop, first + size)
            yield first, expert_view(moe.experts, {n: source.read(f"{prefix}.{n}", first, stop) for n in names})

    return chunks


class TokenStore:
    """Where the per-token buffers (hidden states, MoE inputs, routed outputs) live: in memory, or in
    memory-mapped files under `directory`, which the OS pages out, so a calibration set larger than memory
    still runs. Each file is unlinked as soon as it is mapped: nothing is left behind, even on a crash."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory
        self.count = 0

    def zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self.directory is None or like.device.type != "cpu":
            return torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"tokens-{os.getpid()}-{self.count}.bin"
        self.count += 1
        mapped = torch.from_file(str(path), shared=True, size=math.prod(shape), dtype=like.dtype).view(shape)
        path.unlink()
        return mapped

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.directory is None:
            return tensor
        return self.zeros(tuple(tensor.shape), tensor).copy_(tensor)


@dataclass
class LayerInputs:
    """What each decoder layer receives, per calibration batch."""

    hidden: list[torch.Tensor]  # [B, L, H] per batch: the input of the next layer to run
    arguments: list[list[dict]]  # per decoder layer, per batch: keyword arguments the model passes it
    store: TokenStore = field(default_factory=TokenStore)


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records what the model passes it and returns the hidden states unchanged."""

    def __init__(self, layer: nn.Module, store: list[dict]):
        super().__init__()
        self.__dict__["_layer"] = layer
        self.__dict__["_store"] = store

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError("decoder layers are expected to get keyword arguments besides the hidden states")
        self.__dict__["_store"].append({"hidden": hidden_states, **kwargs})
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, architecture: Architecture, blocks: torch.Tensor,
                         batch_size: int, store: TokenStore | None = None) -> LayerInputs:
    """Embed every block and record each decoder layer's arguments, running no decoder layer."""
    layers = decoder_layers(model, architecture)
    originals = list(layers)
    stores: list[list[dict]] = [[] for _ in originals]
    for index, layer in enumerate(originals):
        layers[index] = _Recorder(layer, stores[index])
    body = getattr(model, "base_model", model)
    device = _device_of(body)
    try:
        for batch in blocks.split(batch_size):
            body(input_ids=batch.to(device), use_cache=False)
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    store = store or TokenStore()
    hidden = [store.keep(record["hidden"].float()) for record in stores[0]]
    arguments = [[{k: v for k, v in record.items() if k != "hidden"} for record in kept] for kept in stores]
    return LayerInputs(hidden, arguments, store)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _layer_output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


_batch = threading.local()  # which calibration batch this thread runs (hooks and the replay read it)
# A decoder layer's working memory per calibration batch, in float32 copies of the batch's hidden states: a
# generous bound for attention's projections and a dense MLP several times the hidden size wide.
BATCH_WORKING_COPIES = 32


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes); unlimited where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**62


def batches_at_once(inputs: LayerInputs) -> int:
    """As many calibration batches at once as there are workers, fewer where their working memory would pass a
    quarter of free memory (on a machine of many cores, a dense layer of every batch at once could outweigh the
    rest of the run). Which batches run together never changes the bits."""
    per_batch = inputs.hidden[0].numel() * 4 * BATCH_WORKING_COPIES
    return max(1, min(workers(), available_memory() // 4 // max(per_batch, 1)))


def each_batch(layer: nn.Module, inputs: LayerInputs, index: int, keep: Callable[[int, torch.Tensor], None]) -> None:
    """Run decoder layer `index` on every calibration batch, several at once (batches_at_once);
    `keep(batch, output)` gets the outputs in batch order, a wave at a time (so a memory-mapped store still
    holds at most a wave in memory)."""
    def one(batch: int) -> torch.Tensor:
        _batch.index = batch
        return _layer_output(layer(inputs.hidden[batch], **inputs.arguments[index][batch]))

    at_once = batches_at_once(inputs)
    for first in range(0, len(inputs.hidden), at_once):
        wave = range(first, min(first + at_once, len(inputs.hidden)))
        for batch, output in zip(wave, parallel_map(one, wave)):
            keep(batch, output)


@torch.no_grad()
def layer_outputs(layer: nn.Module, inputs: LayerInputs, index: int) -> list[torch.Tensor]:
    """Decoder layer `index`'s outputs on every calibration batch, kept in the inputs' store."""
    outputs: list[torch.Tensor] = []
    each_batch(layer, inputs, index, lambda batch, output: outputs.append(inputs.store.keep(output)))
    return outputs


@torch.no_grad()
def run_moe_layer(
    layer: nn.Module,
    moe: MoELayer,
    architecture: Architecture,
    inputs: LayerInputs,
    chunks: Callable[[], Iterator[ExpertChunk]],
    accumulator: LayerAccumulator | None = None,
    keep_rest: bool = False,
    world: World = SINGLE,
) -> tuple[list[torch.Tensor], BlockTokens]:
    """Run one MoE decoder layer on every batch, its experts chunk by chunk; statistics go to `accumulator`.

    Pass 1 runs the layer with the experts replaced by zeros, capturing the MoE block's inputs; one expert
    pass then computes the routed output of all tokens; pass 2 replays that output into the layer.
    Returns the layer's outputs and the block's inputs and routed output on every token (with `keep_rest`,
    also the layer's output without the routed experts, i.e. pass 1's).
    `world`: `chunks` holds this rank's share of the experts; the ranks' contributions are added up per token
    in ascending expert order, as one process adds them.
    """
    captured: dict[int, torch.Tensor] = {}  # per batch (its thread's), kept in batch order after each wave
    hook = moe.block.register_forward_pre_hook(
        lambda module, args: captured.__setitem__(_batch.index, args[0].reshape(-1, args[0].shape[-1]))
    )
    replay: list[torch.Tensor] = []
    moe.experts.forward = lambda hidden_states, *args, **kwargs: _routed_output(hidden_states, replay)
    try:
        rest, kept = [], []

        def keep_pass_one(batch: int, output: torch.Tensor) -> None:
            kept.append(inputs.store.keep(captured.pop(batch)))
            if keep_rest:
                rest.append(output)

        each_batch(layer, inputs, moe.index, keep_pass_one)
        rest = torch.cat([r.reshape(-1, r.shape[-1]).float() for r in rest]) if keep_rest else None
        sizes = [c.shape[0] for c in kept]
        x = inputs.store.zeros((sum(sizes), kept[0].shape[-1]), kept[0])
        torch.cat(kept, out=x)
        kept.clear()
        probs, weights, indices = route_tokens(moe, architecture, x)
        if accumulator is not None:
            accumulator.add_routing(probs, indices, x)
        out = inputs.store.zeros(tuple(x.shape), torch.empty(0, dtype=torch.float32, device=x.device))
        slots = inputs.store.zeros((*indices.shape, x.shape[-1]), out) if world.size > 1 else None
        routed = expert_pass(x, indices, weights, chunks(), architecture, accumulator,
                             gate_on_input=architecture.gate_on_input, out=out, slots=slots)
        if slots is not None:
            world.sum(slots)
            routed = add_slots(slots, indices, out)
            del slots
        hook.remove()
        replay.extend(routed.split(sizes))
        outputs = layer_outputs(layer, inputs, moe.index)
        return outputs, BlockTokens(x, routed, probs, rest)
    finally:
        hook.remove()
        del moe.experts.forward


def _routed_output(hidden_states: torch.Tensor, replay: list[torch.Tensor]) -> torch.Tensor:
    """What the experts module returns: zeros while capturing, then the precomputed routed output of the
    batch this thread runs.

    Families that sum per-expert rows afterwards (Llama 4 passes [E*T, H]) get it in the first T rows."""
    out = torch.zeros_like(hidden_states)
    if replay:
        routed = replay[_batch.index]
        out[: routed.shape[0]] = routed.to(out.dtype)
    return out


@timed("calibrate")
def calibrate_layer(
    model: nn.Module,
    layer: nn.Module,
    moe: MoELayer,
    architecture: Architecture,
    inputs: LayerInputs,
    source: TensorSource,
    *,
    max_router_inputs: int = 8192,
    output_samples: int = 0,
    with_weight_gram: bool = False,
    original: LayerInputs | None = None,
    world: World = SINGLE,
):
    """Statistics of one MoE layer on its inputs, the layer's original outputs, and the MoE block's
    inputs and routed output on every token (the fitting target).

    `original` (corrective mode): the original model's stream, advanced through this layer too; the target
    then becomes the routed output that makes this layer's output on `inputs` equal the original model's
    layer output on `original`, so a fit also corrects the drift of the compressed layers before it.
    `world`: this rank reads and runs only its share of the experts; every rank gets the whole layer's statistics."""
    share = world.share(moe.num_experts)
    if original is not None:
        original_outputs, _ = run_moe_layer(layer, moe, architecture, original,
                                            expert_chunks(model, moe, source, experts=share), world=world)
    tokens = sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
    accumulator = LayerAccumulator(moe, architecture, tokens, max_router_inputs, output_samples)
    outputs, block = run_moe_layer(layer, moe, architecture, inputs, expert_chunks(model, moe, source, experts=share),
                                   accumulator, keep_rest=original is not None, world=world)
    accumulator.share(world)
    # weight-space distances pair every expert with every other: each rank reads them all (only that planner)
    gram = weight_gram(expert_chunks(model, moe, source), moe.num_experts) if with_weight_gram else None
    if original is not None:
        wanted = torch.cat([o.reshape(-1, o.shape[-1]).float() for o in original_outputs])
        block = BlockTokens(block.inputs, wanted - block.rest, block.scores, block.rest)
        original.hidden = original_outputs
    return accumulator.result(gram), outputs, block


def run_dense_streams(layer: nn.Module, inputs: LayerInputs, original: LayerInputs | None, index: int) -> None:
    """Advance the calibration stream (and the original model's, in corrective mode) through a dense layer."""
    inputs.hidden = layer_outputs(layer, inputs, index)
    if original is not None:
        original.hidden = layer_outputs(layer, original, index)


def original_stream(inputs: LayerInputs, corrective: bool) -> LayerInputs | None:
    """A second stream of hidden states that stays on the original model (corrective mode), else None."""
    return LayerInputs(list(inputs.hidden), inputs.arguments, inputs.store) if corrective else None


def calibrate_model(
    model: nn.Module,
    architecture: Architecture,
    blocks: torch.Tensor,
    *,
    batch_size: int = 4,
    max_router_inputs: int = 8192,
    output_samples: int = 0,
    with_weight_gram: bool = False,
    after_layer: Callable[[MoELayer, LayerStats, BlockTokens], bool] | None = None,
    offload_dir: Path | None = None,
    progress: bool = True,
    corrective: bool = False,
):
    """Statistics of every MoE layer of a model in memory, computed layer by layer.

    `after_layer(moe, stats, block)` may compress the layer in place (block: its inputs and original routed
    output on every token, for the fitting stages); returning True makes the next layers see the compressed
    layer's outputs (sequential mode), False the original's.
    `offload_dir`: keep the per-token buffers in memory-mapped files there instead of in memory.
    `corrective` (sequential mode): the original model also runs, and each layer's routed-output target
    becomes what makes the compressed stream's layer output equal the original stream's (upstream drift included).
    """
    moe_layers(model, architecture)  # fails early with a clear message when there is none
    with in_float32(*outside_layers(model, architecture)):
        inputs = capture_layer_inputs(model, architecture, blocks, batch_size, TokenStore(offload_dir))
    original = original_stream(inputs, corrective)
    results = []
    layers = decoder_layers(model, architecture)
    for index in tqdm(range(len(layers)), desc="calibrating", unit="layer", disable=not progress):
        moe = moe_layer_at(model, architecture, index)
        with in_float32(layers[index], keep=moe and moe.experts):  # a bf16 model computes a layer at a time in float32
            stats = calibrate_one_layer(model, architecture, index, moe, inputs, original, after_layer,
                                        max_router_inputs=max_router_inputs, output_samples=output_samples,
                                        with_weight_gram=with_weight_gram)
        if stats is not None:
            results.append(stats)
    return results


def calibrate_one_layer(model: nn.Module, architecture: Architecture, index: int, moe: MoELayer | None,
                        inputs: LayerInputs, original: LayerInputs | None, after_layer, **options) -> LayerStats | None:
    """Advance the calibration stream through decoder layer `index` (its MoE block `moe`, None if dense): a dense
    layer runs, an MoE layer is calibrated (and compressed by `after_layer`); its statistics, or None."""
    layer = decoder_layers(model, architecture)[index]
    if moe is None:
        run_dense_streams(layer, inputs, original, index)
        return None
    stats, outputs, block = calibrate_layer(model, layer, moe, architecture, inputs, MemorySource(model),
                                            original=original, **options)
    if after_layer is not None and after_layer(moe, stats, block):
        moe = moe_layer_at(model, architecture, index)  # the layer now holds its merged experts
        with timed("calibrate"):
            outputs, _ = run_moe_layer(layer, moe, architecture, inputs, expert_chunks(model, moe, MemorySource(model)))
    del block
    inputs.hidden = outputs
    return stats


def outside_layers(model: nn.Module, architecture: Architecture) -> list[nn.Module]:
    """The base model's direct children other than the decoder layers (embeddings, final norm, rotary)."""
    layers = decoder_layers(model, architecture)
    body = getattr(model, "base_model", model)
    return [child for child in body.children() if child is not layers]
