"""Train a bundled reference MoE on English, French and Spanish Wikipedia.

Seeded and deterministic on the CPU. Writes a normal Hugging Face checkpoint (bf16 safetensors),
its byte-level BPE tokenizer and a training log (the model card comes from scripts/reference_card.py).

    python scripts/train_reference.py --out hcsmoe/reference            # Qwen3-MoE, 32 experts of 64, top-4
    python scripts/train_reference.py --family qwen2_moe --experts 60 --expert-dim 40 --shared-dim 160 \
        --tokenizer hcsmoe/reference --out hcsmoe/reference-qwen2moe    # Qwen1.5-MoE shape: 60 + shared expert
    python scripts/train_reference.py --family deepseek_v3 --steps 1200 --tokenizer hcsmoe/reference \
        --out hcsmoe/reference-deepseek-v3   # DeepSeek-V3 shape: sigmoid routing, 4 groups, shared expert
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from hcsmoe.calibration.text import LANGUAGES, token_stream, wiki_texts

EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the training text, wrapped so AutoTokenizer loads it offline."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS, pad_token=EOS)


FAMILIES = {"qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM), "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM),
            "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}


def model_config(args, vocab_size: int, eos_id: int):
    """Qwen3-MoE (normalised top-k, no shared expert), Qwen2-MoE (Qwen1.5-MoE's shape: un-normalised
    top-k plus an always-on shared expert behind a sigmoid gate) or DeepSeek-V3 (sigmoid scores chosen with a
    correction bias within the best groups, a shared expert, multi-head latent attention, a dense first layer)."""
    if args.family == "deepseek_v3":
        return deepseek_v3_config(args, vocab_size, eos_id)
    config_class = FAMILIES[args.family][0]
    family_keys = ({"shared_expert_intermediate_size": args.shared_dim, "norm_topk_prob": False, "qkv_bias": True}
                   if args.family == "qwen2_moe" else {"norm_topk_prob": True})
    return config_class(
        **family_keys,
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.expert_dim,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads // 2,
        head_dim=args.hidden // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        max_position_embeddings=args.context,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        initializer_range=0.02,
    )


def deepseek_v3_config(args, vocab_size: int, eos_id: int) -> DeepseekV3Config:
    """DeepSeek-V3's layout at the reference's scale: 4 expert groups of which 2 are kept per token, one
    shared expert of the routed experts' width, latent attention, the first layer dense."""
    head = args.hidden // args.heads
    return DeepseekV3Config(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.expert_dim, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, n_shared_experts=1, n_routed_experts=args.experts,
        routed_scaling_factor=2.5, kv_lora_rank=head * 2, q_lora_rank=None, qk_rope_head_dim=head // 4,
        v_head_dim=head // 2, qk_nope_head_dim=head // 2, n_group=4, topk_group=2, num_experts_per_tok=args.top_k,
        first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=args.context,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, initializer_range=0.02, num_mtp_layers=0,
    )


def bias_balancer(model, rate: float):
    """DeepSeek-V3's auxiliary-loss-free balancing: after each step every router's correction bias moves by
    `rate` toward balance (up for an expert below the mean load, down above it). Returns the update, which
    also reports the busiest expert's load over the mean, averaged over layers (1.0 when balanced)."""
    routers, loads = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")], {}

    def record(router, inputs, output):
        loads[router] = torch.bincount(output[2].reshape(-1), minlength=router.num_experts).float()

    for router in routers:
        router.register_forward_hook(record)

    @torch.no_grad()
    def update() -> float:
        peaks = []
        for router, load in loads.items():
            router.e_score_correction_bias += rate * torch.sign(load.mean() - load)
            peaks.append(float(load.max() / load.mean()))
        return sum(peaks) / max(1, len(peaks))

    return update


def batches(stream: torch.Tensor, context: int, batch_size: int, steps: int, seed: int):
    """Random windows of the token stream, reproducible from the seed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - context - 1, (batch_size,), generator=generator)
        yield torch.stack([stream[s : s + context] for s in starts.tolist()])


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load balancing, per layer, averaged over layers (1.0 when perfectly balanced).

    transformers' built-in loss pools all layers' tokens before balancing, which lets each layer keep
    dead experts as long as the layers together look balanced; balancing each layer avoids that.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        experts = probs.shape[-1]
        chosen = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, experts).sum(1).float()
        losses.append(experts * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


def train(model, stream, args) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    log = []
    start = time.time()
    model.router_aux_loss_coef = 0.0  # replaced by the per-layer balance_loss below
    by_bias = args.family == "deepseek_v3"
    balance_by_bias = bias_balancer(model, args.bias_rate) if by_bias else None
    model.train()
    for step, batch in enumerate(batches(stream, args.context, args.batch, args.steps, args.seed)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        out = model(input_ids=batch, labels=batch, output_router_logits=not by_bias)
        balance = torch.tensor(0.0) if by_bias else balance_loss(out.router_logits, args.top_k)
        optimizer.zero_grad(set_to_none=True)
        (out.loss + args.aux_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if by_bias:
            balance = torch.tensor(balance_by_bias())
        if step % 25 == 0 or step == args.steps - 1:
            entry = {"step": step, "loss": round(out.loss.item(), 4), "balance": round(balance.item(), 4),
                     "seconds": round(time.time() - start, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    model.eval()
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="hcsmoe/reference")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen3_moe")
    parser.add_argument("--shared-dim", type=int, default=0, help="qwen2_moe: shared expert width")
    parser.add_argument("--tokenizer", help="reuse this directory's tokenizer instead of training one")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--aux-coef", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bias-rate", type=float, default=0.01,
                        help="deepseek_v3: the correction bias's update speed (its paper: 0.001 over far more steps)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    began = time.time()

    texts = {lang: wiki_texts(lang, "train") for lang in LANGUAGES}
    all_texts = [t for lang in LANGUAGES for t in texts[lang]]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else train_tokenizer(all_texts, args.vocab)
    shuffled = list(all_texts)
    random.Random(args.seed).shuffle(shuffled)
    stream = token_stream(tokenizer, shuffled)
    print(f"tokenizer ready; {stream.numel()} training tokens ({time.time() - began:.0f} s)", flush=True)

    config = model_config(args, len(tokenizer), tokenizer.eos_token_id)
    model = FAMILIES[args.family][1](config)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters", flush=True)
    log = train(model, stream, args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.model_max_length = args.context
    tokenizer.save_pretrained(out)
    recipe = {k: v for k, v in vars(args).items() if k not in ("out", "tokenizer")}
    recipe["training_tokens_seen"] = args.steps * args.batch * args.context
    recipe["corpus_tokens"] = int(stream.numel())
    recipe["train_seconds"] = round(time.time() - began, 1)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    recipe["train_cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    (out / "training_log.json").write_text(json.dumps({"recipe": recipe, "log": log}, indent=1) + "\n")
    print(f"saved to {out} after {time.time() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
