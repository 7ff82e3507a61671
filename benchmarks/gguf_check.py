"""Check that checkpoints convert with llama.cpp's own converter and run in llama.cpp with the same next-token
log-probabilities as in transformers.

    python -m benchmarks.gguf_check                  # the bundled models, original, fewer experts, half width (6)
    python -m benchmarks.gguf_check DIR [DIR ...]    # given checkpoint directories
    python -m benchmarks.gguf_check --tiny           # tiny random Mixtral (bf16), Qwen3-MoE in FP8 and GPT-OSS in
                                                     # MXFP4, and their compressions to 4 of 8 experts (same format)
    python -m benchmarks.gguf_check --llama-cpp SDIST/vendor/llama.cpp

Each checkpoint is converted with llama.cpp's convert_hf_to_gguf.py at --outtype f32 (nothing quantized), loaded
with llama-cpp-python (float32 KV cache too, so that only the order of float32 sums differs) and run on fixed
token ids cut from the bundled validation text; transformers runs the same ids in float32. Reported per
checkpoint: the largest and the mean absolute difference of the log-probabilities over every position and
vocabulary entry, the share of positions whose most likely next token agrees, the mean negative log-likelihood of
the actual next tokens under each runtime, and the share of validation texts that llama.cpp's tokenizer (from the
GGUF) splits into the same ids as transformers. The compressed checkpoints are calibrated on only --blocks blocks
(8 of 256 tokens by default): this checks the format, not the quality.

Needs llama-cpp-python (`pip install llama-cpp-python`, which compiles llama.cpp). The converter is taken from
--llama-cpp (the vendor/llama.cpp folder of an unpacked llama-cpp-python sdist, or a llama.cpp checkout), else
from the sdist of the installed llama-cpp-python version (pip download, unpacked once into the cache), so that
converter and runtime are the same llama.cpp; the converter's own gguf-py comes first on sys.path.

Two things are worked around for the bundled models, without modifying llama.cpp's files:
- Their small custom byte-level BPE tokenizer is not in the converter's table of known pre-tokenizers
  (get_vocab_base_pre hashes how the tokenizer splits a probe text), so the converter as is stops with
  "NotImplementedError: BPE pre-tokenizer was not recognized". This check imports the converter as a module and,
  only where detection fails, writes the pre-tokenizer name "gpt-2" (the same byte-level split). The logits are
  compared on token ids given directly, so the name cannot affect them.
- The bundled Qwen2-MoE ties its output layer to the input embedding; the converter then writes no output.weight,
  which llama.cpp's qwen2moe loader requires, so llama.cpp refuses the GGUF (the original checkpoint's as much as
  the compressed one's). A tied checkpoint that llama.cpp cannot load is converted again from a copy that also
  stores the embedding as lm_head.weight, and the row says so.
With a real model (a Qwen, Mixtral, DeepSeek... tokenizer, untied as the published Qwen2-MoE models are) neither
applies: run `python convert_hf_to_gguf.py OUT_DIR --outfile model.gguf` on the compressed output directory, as on
the original.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
import traceback
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from hcsmoe.calibration.text import LANGUAGES, interleave, token_blocks, wiki_texts
from hcsmoe.checkpoints.architectures import architecture_for, expert_count
from hcsmoe.checkpoints.shards import INDEX_NAME
from hcsmoe.checkpoints.loading import BUNDLED_MODELS, load_config
from hcsmoe.pipeline import compress
from tests.conftest import make_tiny_model  # imported before the converter's gguf-py/tests could shadow `tests`
from tests.quantized import fp8_checkpoint, mxfp4_checkpoint

RESULTS = Path(__file__).parent / "results"
CONVERTER = "convert_hf_to_gguf.py"
CONVERTER_PARTS = (CONVERTER, "conversion/", "gguf-py/")  # what the converter needs from a llama.cpp tree
FALLBACK_PRE_TOKENIZER = "gpt-2"  # llama.cpp's byte-level BPE split, as in the bundled tokenizer
TOKENIZER_TEXTS = 16  # validation texts on which the two tokenizers are compared
EMBEDDING = "model.embed_tokens.weight"
LM_HEAD_PART = "model-untied-lm_head.safetensors"  # named so that the converter's model*.safetensors finds it
UNTIED_NOTE = ("llama.cpp does not load the GGUF converted as is (tied embeddings, no output.weight); "
               "measured on a copy that also stores the embedding as lm_head.weight")


def runtime_version() -> str:
    """Version of the installed llama-cpp-python (exits with an install hint if it is missing)."""
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    return llama_cpp.__version__


def cache_dir() -> Path:
    """Where a downloaded llama.cpp converter is kept between runs."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hcsmoe"


def download_converter(version: str) -> Path:
    """llama.cpp's converter from the llama-cpp-python `version` sdist, unpacked once into the cache."""
    target = cache_dir() / f"llama-cpp-python-{version}" / "llama.cpp"
    if (target / CONVERTER).exists():
        return target
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        f"llama-cpp-python=={version}", "-d", scratch], check=True)
        [sdist] = Path(scratch).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(CONVERTER_PARTS)]
            archive.extractall(scratch, members=members, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(Path(scratch) / prefix, target)
    return target


def gguf_py_version(llama_cpp_dir: Path) -> str:
    """Version of the gguf-py package that comes with the converter."""
    with open(llama_cpp_dir / "gguf-py" / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["version"]


def prepare_converter(llama_cpp_dir: Path) -> None:
    """Make the converter importable with its own gguf-py, falling back to FALLBACK_PRE_TOKENIZER for unknown BPEs."""
    sys.path[:0] = [str(llama_cpp_dir), str(llama_cpp_dir / "gguf-py")]
    logging.basicConfig(level=logging.WARNING)  # the converter's own basicConfig (INFO) is then a no-op
    logging.getLogger("hf-to-gguf").setLevel(logging.ERROR)  # its banner about the unknown pre-tokenizer
    from conversion.base import TextModel

    detect = TextModel.get_vocab_base_pre

    def detect_or_fallback(self, tokenizer) -> str:
        try:
            return detect(self, tokenizer)
        except NotImplementedError:
            return FALLBACK_PRE_TOKENIZER

    TextModel.get_vocab_base_pre = detect_or_fallback


def convert(model_dir: Path, out_file: Path, llama_cpp_dir: Path) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py (prepared by prepare_converter) on model_dir at float32."""
    argv = sys.argv
    sys.argv = [CONVERTER, str(model_dir), "--outtype", "f32", "--outfile", str(out_file)]
    try:
        runpy.run_path(str(llama_cpp_dir / CONVERTER), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code:
            raise RuntimeError(f"{CONVERTER} exited with status {exit_.code}") from exit_
    finally:
        sys.argv = argv


def validation_texts() -> list[str]:
    """The bundled validation articles, languages interleaved."""
    return interleave([wiki_texts(lang, "validation") for lang in LANGUAGES])


def validation_ids(tokenizer, sequences: int, length: int) -> torch.Tensor:
    """The first `sequences` blocks of `length` validation tokens, shape [sequences, length]."""
    return token_blocks(tokenizer, validation_texts(), length, sequences, source="validation text")


def transformers_logprobs(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities of transformers in float32, shape [sequences, length, vocab]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(ids).logits.double(), dim=-1)


def llama_cpp_logprobs(gguf_file: Path, ids: torch.Tensor, threads: int) -> tuple[torch.Tensor, object]:
    """Next-token log-probabilities of llama.cpp (float32 KV cache) on the same ids, and the loaded model."""
    from llama_cpp import GGML_TYPE_F32, Llama

    length = ids.shape[1]
    llm = Llama(model_path=str(gguf_file), logits_all=True, n_ctx=length, n_batch=length, n_threads=threads,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)
    logits = []
    for sequence in ids.tolist():
        llm.reset()
        llm.eval(sequence)
        logits.append(torch.from_numpy(llm.scores[:length].copy()))
    return torch.log_softmax(torch.stack(logits).double(), dim=-1), llm


def tokenizers_agree(llm, tokenizer, texts: list[str]) -> float:
    """Share of texts that llama.cpp's tokenizer (from the GGUF) splits into the same ids as transformers."""
    same = [llm.tokenize(text.encode(), add_bos=False, special=False)
            == tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return sum(same) / len(same)


def compare(reference: torch.Tensor, other: torch.Tensor, ids: torch.Tensor) -> dict:
    """Agreement of two [sequences, length, vocab] log-probability tensors on the same ids."""
    difference = (reference - other).abs()
    targets = ids[:, 1:].unsqueeze(-1)
    return {
        "max_abs_logprob_diff": difference.max().item(),
        "mean_abs_logprob_diff": difference.mean().item(),
        "top1_agreement": (reference.argmax(-1) == other.argmax(-1)).double().mean().item(),
        "nll_transformers": -reference[:, :-1].gather(-1, targets).mean().item(),
        "nll_llama_cpp": -other[:, :-1].gather(-1, targets).mean().item(),
    }


def describe(model_dir: Path) -> dict:
    """Architecture, expert count and expert width from a checkpoint's config.json (keys from hcsmoe's adapters)."""
    config = load_config(model_dir)
    architecture = architecture_for(config)
    return {"architecture": config.architectures[0], "experts": expert_count(config, architecture),
            "neurons": getattr(config, architecture.width_key) if architecture.width_key else None}


def bundled_checkpoints(work: Path, experts: int, blocks: int) -> dict[str, Path]:
    """The bundled models, their compressions to `experts` experts and to every expert at half width (the shape
    the default, --size 0.5, chose for all three), on `blocks` calibration blocks."""
    checkpoints = {}
    for name, path in BUNDLED_MODELS.items():
        checkpoints[name] = path
        compressed, narrowed = work / f"{name}-{experts}e", work / f"{name}-half-width"
        compress(path, num_experts=experts, num_blocks=blocks, progress=False).save(compressed)
        every = describe(path)["experts"]
        compress(path, num_experts=every, width=0.5, num_blocks=blocks, progress=False).save(narrowed)
        checkpoints |= {compressed.name: compressed, narrowed.name: narrowed}
    return checkpoints


def tiny_checkpoints(work: Path) -> dict[str, Path]:
    """Tiny random checkpoints made by the tests' helpers: Mixtral in bf16, and Qwen3-MoE and GPT-OSS laid out as
    Qwen3-30B-A3B-FP8 and GPT-OSS (MXFP4), with their compressions to 4 of 8 experts (which keep the format)."""
    checkpoints = {}
    for source in (make_tiny_model(work / "mixtral", "mixtral", dtype=torch.bfloat16),
                   fp8_checkpoint(work / "qwen3-moe-fp8", "qwen3_moe", (128, 128)),
                   mxfp4_checkpoint(work / "gpt-oss-mxfp4")):
        compressed = work / f"{source.name}-4e"
        compress(source, num_experts=4, num_blocks=4, block_size=32, progress=False).save(compressed)
        checkpoints |= {source.name: source, compressed.name: compressed}
    return checkpoints


def ties_embeddings(model_dir: Path) -> bool:
    """Whether the checkpoint's output layer is its input embedding (no lm_head.weight stored)."""
    return bool(json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings"))


def untied_copy(model_dir: Path, target: Path) -> Path:
    """model_dir (files linked, not copied) with its tied input embedding also stored as lm_head.weight."""
    target.mkdir()
    for file in model_dir.iterdir():
        if file.name not in ("config.json", INDEX_NAME):
            (target / file.name).symlink_to(file.resolve())
    config = json.loads((model_dir / "config.json").read_text()) | {"tie_word_embeddings": False}
    (target / "config.json").write_text(json.dumps(config, indent=2))
    index = json.loads((model_dir / INDEX_NAME).read_text()) if (model_dir / INDEX_NAME).exists() else None
    part = index["weight_map"][EMBEDDING] if index else "model.safetensors"
    with safe_open(model_dir / part, "pt") as weights:
        save_file({"lm_head.weight": weights.get_tensor(EMBEDDING)}, target / LM_HEAD_PART, metadata={"format": "pt"})
    if index:
        index["weight_map"]["lm_head.weight"] = LM_HEAD_PART
        (target / INDEX_NAME).write_text(json.dumps(index, indent=2))
    return target


def gguf_logprobs(model_dir: Path, work: Path, llama_cpp_dir: Path, ids: torch.Tensor,
                  threads: int) -> tuple[torch.Tensor, object, str | None]:
    """Convert model_dir and run it in llama.cpp: log-probabilities, the loaded model, and a note if it was untied.

    llama.cpp loads some architectures only with a stored output tensor (its qwen2moe loader requires
    output.weight, while the converter writes none for tied embeddings), so a tied checkpoint that llama.cpp cannot
    load is converted again from untied_copy.
    """
    gguf_file = work / f"{model_dir.name}.f32.gguf"
    convert(model_dir, gguf_file, llama_cpp_dir)
    try:
        return *llama_cpp_logprobs(gguf_file, ids, threads), None
    except ValueError:  # llama-cpp-python's "Failed to load model from file"
        if not ties_embeddings(model_dir):
            raise
    untied = untied_copy(model_dir, work / f"{model_dir.name}-untied")
    gguf_file = work / f"{untied.name}.f32.gguf"
    convert(untied, gguf_file, llama_cpp_dir)
    return *llama_cpp_logprobs(gguf_file, ids, threads), UNTIED_NOTE


def check(model_dir: Path, work: Path, llama_cpp_dir: Path, sequences: int, length: int, threads: int) -> dict:
    """Convert one checkpoint, run it in both runtimes and compare; a failure is recorded, not raised."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = validation_ids(tokenizer, sequences, length)
    try:
        other, llm, note = gguf_logprobs(model_dir, work, llama_cpp_dir, ids, threads)
    except Exception:
        return {"error": traceback.format_exc(limit=-4).strip().splitlines()}
    reference = transformers_logprobs(model_dir, ids)
    agreement = tokenizers_agree(llm, tokenizer, validation_texts()[:TOKENIZER_TEXTS])
    llm.close()
    return compare(reference, other, ids) | {"tokenizer_agreement": agreement} | ({"note": note} if note else {})


def table(rows: list[dict]) -> str:
    """Markdown table of the per-checkpoint results, with the rows' notes below it."""
    lines = ["| checkpoint | architecture | experts | neurons | max abs Δ log p | mean abs Δ log p | top-1 agreement "
             "| NLL transformers | NLL llama.cpp | tokenizer agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    marks: dict[str, str] = {}
    for r in rows:
        mark = marks.setdefault(r["note"], f"[{len(marks) + 1}]") if "note" in r else ""
        head = f"| {r['checkpoint']}{mark} | {r['architecture']} | {r['experts']} | {r.get('neurons') or '–'} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][-1]} |" + " |" * 5)
        else:
            lines.append(f"{head} {r['max_abs_logprob_diff']:.2e} | {r['mean_abs_logprob_diff']:.2e} "
                         f"| {r['top1_agreement']:.4f} | {r['nll_transformers']:.4f} | {r['nll_llama_cpp']:.4f} "
                         f"| {r['tokenizer_agreement']:.2f} |")
    return "\n\n".join(["\n".join(lines)] + [f"{mark} {note}." for note, mark in marks.items()])


def report(rows: list[dict], setup: dict, out: Path) -> str:
    """Write out.json and out.md; return the markdown."""
    compressed = (f" Compressed here: {setup['experts']} experts, and every expert at half its width, each calibrated "
                  f"on only {setup['blocks']} blocks "
                  f"(this checks the format, not quality)." if "blocks" in setup else "")
    text = (f"llama.cpp (llama-cpp-python {setup['llama_cpp_python']}, its converter with gguf-py {setup['gguf_py']}) "
            f"against transformers {setup['transformers']}, both float32 (GGUF written with --outtype f32, float32 "
            f"KV cache), on {setup['sequences']} sequences of {setup['tokens']} validation tokens.{compressed}\n\n"
            + table(rows) + f"\n\nWhole check: {setup['seconds'] / 60:.1f} min on {setup['threads']} threads.\n")
    out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path, help="checkpoint directories [the bundled models, "
                        "original and compressed]")
    parser.add_argument("--tiny", action="store_true", help="check tiny Mixtral, FP8 and MXFP4 checkpoints instead")
    parser.add_argument("--llama-cpp", type=Path, help="llama.cpp tree holding convert_hf_to_gguf.py and gguf-py "
                        "[downloaded: the installed llama-cpp-python's sdist]")
    parser.add_argument("--experts", type=int, default=16, help="experts kept when compressing the bundled models")
    parser.add_argument("--blocks", type=int, default=8, help="calibration blocks when compressing")
    parser.add_argument("--sequences", type=int, default=4, help="validation sequences compared")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "gguf", help="results, as OUT.json and OUT.md")
    args = parser.parse_args()
    start = time.perf_counter()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    version = runtime_version()
    llama_cpp_dir = (args.llama_cpp or download_converter(version)).resolve()
    if not (llama_cpp_dir / CONVERTER).exists():
        sys.exit(f"no {CONVERTER} in {llama_cpp_dir}")
    prepare_converter(llama_cpp_dir)
    with tempfile.TemporaryDirectory(prefix="hcsmoe-gguf-") as scratch:
        work = Path(scratch)
        if args.models:
            checkpoints = {m.name: m for m in args.models}
        elif args.tiny:
            checkpoints = tiny_checkpoints(work)
        else:
            checkpoints = bundled_checkpoints(work, args.experts, args.blocks)
        rows = []
        for name, path in checkpoints.items():
            row = {"checkpoint": name, **describe(path),
                   **check(path, work, llama_cpp_dir, args.sequences, args.tokens, args.threads)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    converter = str(args.llama_cpp) if args.llama_cpp else f"llama-cpp-python {version} sdist"
    setup = {"llama_cpp_python": version, "gguf_py": gguf_py_version(llama_cpp_dir), "converter": converter,
             "transformers": transformers.__version__, "torch": torch.__version__, "sequences": args.sequences,
             "tokens": args.tokens, "threads": args.threads, "seconds": round(time.perf_counter() - start, 1)}
    if not args.models and not args.tiny:
        setup |= {"experts": args.experts, "blocks": args.blocks}
    print(report(rows, setup, args.out))


if __name__ == "__main__":
    main()
