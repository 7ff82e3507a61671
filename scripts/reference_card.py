"""Measure the bundled reference model and write its model card (README.md) and card.json.

Validation perplexity and bits per byte per language, and per-layer expert usage counted over the
validation text of all three languages together (the "no dead expert" check: every expert must get
at least 20% of the uniform share 1/E).

    python scripts/reference_card.py [--model hcsmoe/reference | hcsmoe/reference-qwen2-moe | hcsmoe/reference-deepseek-v3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers.utils import logging

from hcsmoe.calibration.text import LANGUAGES, token_stream, wiki_texts
from hcsmoe.checkpoints.architectures import architecture_for, expert_count
from hcsmoe.evaluation.evaluate import evaluate
from hcsmoe.checkpoints.loading import REFERENCE_MODEL, load_model, load_tokenizer
from hcsmoe.evaluation.usage import routing_counts, share_of_uniform

DEAD_THRESHOLD = 0.2


def validation_blocks(tokenizer, lang: str, context: int) -> torch.Tensor:
    stream = token_stream(tokenizer, wiki_texts(lang, "validation"))
    usable = stream.numel() // context * context
    return stream[:usable].view(-1, context)


def usage_table(counts_by_lang: dict[str, dict[int, torch.Tensor]]) -> tuple[dict, list[str]]:
    """Per layer: min/max share of uniform over all languages, and each language's most-used experts."""
    layers = sorted(next(iter(counts_by_lang.values())))
    summary, lines = {}, ["| layer | min share of uniform (all languages) | max | experts below 20% | top-3 experts en / fr / es |",
                          "|---|---|---|---|---|"]
    for layer in layers:
        total = sum(counts[layer] for counts in counts_by_lang.values())
        share = share_of_uniform(total)
        tops = [share_of_uniform(c[layer]).topk(3).indices.tolist() for c in counts_by_lang.values()]
        dead = int((share < DEAD_THRESHOLD).sum())
        summary[layer] = {"min_share": round(float(share.min()), 3), "max_share": round(float(share.max()), 3),
                          "below_threshold": dead, "counts": total.tolist(),
                          "per_language": {lang: c[layer].tolist() for lang, c in counts_by_lang.items()}}
        lines.append(f"| {layer} | {share.min():.2f} | {share.max():.2f} | {dead} | "
                     + " / ".join(",".join(map(str, t)) for t in tops) + " |")
    return summary, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REFERENCE_MODEL))
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(2)
    directory = Path(args.model)
    model, tokenizer = load_model(directory), load_tokenizer(directory)
    context = model.config.max_position_embeddings

    evaluation = evaluate(model, tokenizer, languages=LANGUAGES)
    counts = {lang: routing_counts(model, validation_blocks(tokenizer, lang, context)) for lang in LANGUAGES}
    usage, usage_lines = usage_table(counts)
    training = json.loads((directory / "training_log.json").read_text())
    recipe = training["recipe"]
    card = {"validation": evaluation["languages"], "usage": usage, "recipe": recipe}
    (directory / "card.json").write_text(json.dumps(card, indent=1) + "\n")

    c = model.config
    params = sum(p.numel() for p in model.parameters())
    family = type(model).__name__
    if c.model_type == "qwen2_moe":
        title = "hcsmoe reference Qwen2-MoE (the shape of Qwen1.5-MoE)"
        shape = (f"**{c.num_experts} routed experts, top-{c.num_experts_per_tok}** (expert width {c.moe_intermediate_size}, "
                 f"top-k weights not renormalised) **plus an always-on shared expert** (width "
                 f"{c.shared_expert_intermediate_size}) behind a sigmoid gate, as Qwen1.5-MoE-A2.7B")
        tokenizer_line = "Tokenizer: the reference model's (`hcsmoe/reference`), reused as is."
    elif c.model_type == "deepseek_v3":
        title = "hcsmoe reference DeepSeek-V3 (the routing of DeepSeek-V3)"
        shape = (f"**{c.n_routed_experts} routed experts, top-{c.num_experts_per_tok}**, chosen on sigmoid scores plus a "
                 f"correction bias within the best {c.topk_group} of {c.n_group} expert groups (expert width "
                 f"{c.moe_intermediate_size}, normalised top-k weights scaled by {c.routed_scaling_factor}) **plus an "
                 f"always-on shared expert** (width {c.moe_intermediate_size * c.n_shared_experts}), as DeepSeek-V3; "
                 f"multi-head latent attention (key/value rank {c.kv_lora_rank}); "
                 + ("the first layer" if c.first_k_dense_replace == 1 else f"the first {c.first_k_dense_replace} layers")
                 + f" dense (width {c.intermediate_size})")
        tokenizer_line = "Tokenizer: the reference model's (`hcsmoe/reference`), reused as is."
    else:
        title = "hcsmoe reference MoE"
        shape = (f"**{c.num_experts} routed experts, top-{c.num_experts_per_tok}** (expert width {c.moe_intermediate_size}, "
                 "normalised top-k weights)")
        tokenizer_line = "Tokenizer: byte-level BPE trained with `tokenizers` on the training text."
    cpu = recipe.get("train_cpu_seconds")
    timing = f"Wall time of the whole script on 2 CPU cores: {recipe['train_seconds'] / 60:.1f} minutes"
    if cpu:
        timing += f" ({cpu / 60:.1f} CPU-minutes: {cpu / 120:.1f} minutes of both cores)"
    balancing = (f"DeepSeek-V3's auxiliary-loss-free balancing (after every step each router's correction bias moves "
                 f"by {recipe.get('bias_rate')} toward the mean load; no balancing loss)" if c.model_type == "deepseek_v3" else
                 f"per-layer Switch load-balancing loss (coefficient {recipe['aux_coef']}; transformers' built-in loss "
                 "pools all layers and left dead experts in each)")
    ppl_lines = ["| language | validation tokens | perplexity | bits per byte |", "|---|---|---|---|"] + [
        f"| {lang} | {m['tokens']} | {m['ppl']:.2f} | {m['bpb']:.3f} |" for lang, m in evaluation["languages"].items()
    ]
    text = f"""---
license: cc-by-sa-4.0
language: [en, fr, es]
library_name: transformers
tags: [mixture-of-experts, {c.model_type}, hcsmoe-reference]
---
# {title}

A small `{family}` trained from scratch on English, French and Spanish Wikipedia lead
sections, bundled with hcsmoe as the model every compression method is measured on. It is an
ordinary Hugging Face checkpoint: `AutoModelForCausalLM.from_pretrained(this_directory)` and
`AutoTokenizer.from_pretrained(this_directory)` load it with no network and no custom code.

## Architecture
{c.num_hidden_layers} decoder layers, hidden size {c.hidden_size}, {c.num_attention_heads} attention heads
({c.num_key_value_heads} key/value), {"each MoE layer a" if c.model_type == "deepseek_v3" else "every layer an MoE"} block of {shape}, context {context} tokens, tied embeddings,
byte-level BPE vocabulary of {c.vocab_size}. {params / 1e6:.2f} M parameters, stored in bfloat16.

## Data
Wikipedia lead sections of the Level-4 Vital Articles (`hcsmoe/corpora/wiki-vital`), `train` split only,
all three languages shuffled together ({recipe['corpus_tokens']:,} tokens). Text by Wikipedia contributors,
licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); see `hcsmoe/corpora/README.md`.
The `validation` split was never trained on.

## Training recipe (`scripts/train_reference.py`, seeded and deterministic on the CPU)
{tokenizer_line} Model: AdamW (β 0.9/0.95,
weight decay 0.1), peak learning rate {recipe['lr']}, {recipe['warmup']} warm-up steps then cosine decay to 10%,
{recipe['steps']} steps of {recipe['batch']} × {recipe['context']} tokens ({recipe['training_tokens_seen']:,} tokens seen),
{balancing}, gradient clipping 1.0, seed {recipe['seed']},
{recipe['threads']} CPU threads. {timing}.

## Validation perplexity (non-overlapping windows of {context} tokens, float32)
{chr(10).join(ppl_lines)}

## Expert usage
Share of top-{c.num_experts_per_tok} routing per expert, divided by the uniform share 1/{expert_count(c, architecture_for(c))}, counted over the
validation text of all three languages together. An expert is "dead" below {DEAD_THRESHOLD}. The last column lists
each language's three most-used experts: experts specialise by language.

{chr(10).join(usage_lines)}

Reproduce these numbers: `python scripts/reference_card.py --model hcsmoe/{directory.name}` (writes this card and `card.json`).
"""
    (directory / "README.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
