"""Evaluation numbers checked against independent computations on models whose logits are known."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import BertConfig, PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hcsmoe.cli import main
from hcsmoe.errors import UserError
from hcsmoe.evaluation.scoring import compare, perplexity
from hcsmoe.evaluation.evaluate import evaluate, format_table
from hcsmoe.evaluation.generation import generation_agreement
from hcsmoe.evaluation.tasks import run_tasks

V = 257  # the byte tokenizer below: id 0 is <|endoftext|>, byte b is id b + 1
CONTEXT = 16
MC_FILE = Path(__file__).parent.parent / "hcsmoe" / "corpora" / "multiple-choice" / "bigbench-strategyqa.jsonl"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte and no merges, so byte counts are known without decoding."""
    to_char = bytes_to_unicode()
    vocab = {"<|endoftext|>": 0} | {to_char[b]: b + 1 for b in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


class FixedLogits(torch.nn.Module):
    """Next-token logits = bigram[current token] + position[index inside the window]: known exactly, and
    dependent on where windows start, so wrong window boundaries change the numbers."""

    def __init__(self, bigram: torch.Tensor, position: torch.Tensor):
        super().__init__()
        self.bigram, self.position = bigram, position
        self.config = SimpleNamespace(vocab_size=bigram.shape[1], max_position_embeddings=position.shape[0])

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bigram[input_ids] + self.position[: input_ids.shape[1]])


def random_model(seed: int, vocab: int = V) -> FixedLogits:
    generator = torch.Generator().manual_seed(seed)
    bigram = torch.randn(vocab, vocab, generator=generator) * 3
    return FixedLogits(bigram, torch.randn(CONTEXT, vocab, generator=generator))


def uniform_model(vocab: int = V) -> FixedLogits:
    return FixedLogits(torch.zeros(vocab, vocab), torch.zeros(CONTEXT, vocab))


def predicted_positions(n: int, window: int) -> list[tuple[int, int]]:
    """(index in stream, index in window) of every token that is predicted: all but each window's first."""
    return [(i, i % window) for i in range(n) if i % window != 0]


def expected_log_probs(model: FixedLogits, ids: torch.Tensor, i: int, t: int) -> torch.Tensor:
    return (model.bigram[ids[i - 1]] + model.position[t - 1]).double().log_softmax(-1)


def stream(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, window, batch_size", [(40, 7, 2), (36, 7, 3), (7, 7, 8), (33, 16, 1)])
def test_perplexity_matches_a_loop_over_positions(n, window, batch_size):
    model, ids = random_model(1), stream(n)
    positions = predicted_positions(n, window)
    nll = -sum(expected_log_probs(model, ids, i, t)[ids[i]].item() for i, t in positions)
    result = perplexity(model, ids, window, batch_size)
    assert result["tokens"] == len(positions)
    assert result["nll"] == pytest.approx(nll, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(nll / len(positions)), rel=1e-6)


def test_uniform_model_has_perplexity_v_and_bits_per_byte_by_hand():
    texts = ["The cat sat on the mat.", "A second, longer document about nothing at all in particular."]
    result = evaluate(uniform_model(), byte_tokenizer(), texts={"mine": texts}, window=10, batch_size=3)
    ids = [b + 1 for b in texts[0].encode()] + [0] + [b + 1 for b in texts[1].encode()] + [0]
    predicted = [ids[i] for i, _ in predicted_positions(len(ids), 10)]
    text_bytes = sum(1 for token in predicted if token != 0)  # the end-of-text separators are 0 bytes
    metrics = result["languages"]["mine"]
    assert metrics["tokens"] == len(predicted) == len(ids) - math.ceil(len(ids) / 10)
    assert metrics["ppl"] == pytest.approx(V, rel=1e-6)
    assert metrics["bpb"] == pytest.approx(len(predicted) * math.log2(V) / text_bytes, rel=1e-6)
    assert "kl" not in metrics and "reference" not in result


def test_bits_per_byte_counts_multibyte_characters_as_their_utf8_bytes():
    text = "Un été à Málaga, ñandú"  # 22 characters, 28 bytes
    result = evaluate(uniform_model(), byte_tokenizer(), texts={"es": [text]}, window=CONTEXT)
    ids = [b + 1 for b in text.encode()] + [0]
    assert len(ids) == 29 and ids[CONTEXT] - 1 < 0x80  # the second window starts on a whole character
    predicted = [ids[i] for i, _ in predicted_positions(len(ids), CONTEXT)]
    assert result["languages"]["es"]["bpb"] == pytest.approx(len(predicted) * math.log2(V) / (len(predicted) - 1))


def test_bundled_language_is_cut_to_max_tokens():
    result = evaluate(uniform_model(), byte_tokenizer(), languages=("fr",), max_tokens=300, window=CONTEXT)
    assert list(result["languages"]) == ["fr"]
    assert result["languages"]["fr"]["tokens"] == 300 - math.ceil(300 / CONTEXT)
    assert result["languages"]["fr"]["ppl"] == pytest.approx(V, rel=1e-6)
    assert result["tasks"] == {} and result["seconds"] >= 0


def test_the_bundled_novels_load_as_whole_chapters_of_prose():
    """The out-of-domain text (benchmarks/out_of_domain.py) is what the attribution note says: every chapter of
    both novels, one document each, wrapped lines joined, no title page or licence boilerplate."""
    from hcsmoe.calibration.text import load_texts

    novels = MC_FILE.parent.parent / "novels"
    chapters = {name: load_texts(str(novels / f"austen-{name}.jsonl.gz")) for name in ("prideprejudice", "persuasion")}
    assert {name: len(texts) for name, texts in chapters.items()} == {"prideprejudice": 61, "persuasion": 24}
    assert chapters["prideprejudice"][0].startswith("It is a truth universally acknowledged")
    for texts in chapters.values():
        assert all(len(text) > 2000 and "\n\n" in text for text in texts)
        assert not any("Gutenberg" in text or "\n" in text.replace("\n\n", "") for text in texts)


def test_kl_of_a_model_with_itself_is_zero_and_top1_is_one():
    model = random_model(2)
    result = compare(model, model, stream(50), CONTEXT, 2)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1"] == 1.0 and result["tokens"] == 50 - 4


def test_kl_against_a_uniform_model_is_the_closed_form():
    reference = FixedLogits(torch.zeros(V, V), torch.zeros(CONTEXT, V))
    reference.position[:, 5] = 3.0  # every position: token 5 has weight e^3, the others 1
    p5 = math.exp(3) / (math.exp(3) + V - 1)
    p_other = 1 / (math.exp(3) + V - 1)
    closed_form = p5 * math.log(p5 * V) + (V - 1) * p_other * math.log(p_other * V)
    result = compare(uniform_model(), reference, stream(40), CONTEXT, 4)
    assert result["kl"] == pytest.approx(closed_form, rel=1e-5)
    assert result["top1"] == 0.0  # uniform argmax is token 0, the reference's is token 5


def test_kl_and_top1_match_a_loop_over_positions():
    model, noise, ids = random_model(3), random_model(4), stream(45)
    reference = FixedLogits(model.bigram + noise.bigram, model.position)  # close enough to agree sometimes
    positions = predicted_positions(45, 10)
    kl, agree = 0.0, 0
    for i, t in positions:
        log_q, log_p = expected_log_probs(model, ids, i, t), expected_log_probs(reference, ids, i, t)
        kl += (log_p.exp() * (log_p - log_q)).sum().item()
        agree += int(log_q.argmax() == log_p.argmax())
    result = compare(model, reference, ids, 10, 3)
    assert result["kl"] == pytest.approx(kl / len(positions), rel=1e-5)
    assert result["top1"] == agree / len(positions)
    assert 0 < agree < len(positions)


def test_evaluate_with_reference_reports_both_models_from_one_pass():
    model, reference, tokenizer = random_model(5), random_model(6), byte_tokenizer()
    texts = {"t": ["Some text that is long enough for a few windows of sixteen tokens."]}
    result = evaluate(model, tokenizer, reference=reference, texts=texts)
    ids = torch.tensor([b + 1 for b in texts["t"][0].encode()] + [0])
    expected = compare(model, reference, ids, CONTEXT, 8)
    assert result["languages"]["t"]["kl"] == pytest.approx(expected["kl"])
    assert result["languages"]["t"]["top1"] == pytest.approx(expected["top1"])
    assert result["languages"]["t"]["ppl"] == pytest.approx(perplexity(model, ids, CONTEXT, 8)["ppl"])
    assert result["reference"]["languages"]["t"]["ppl"] == pytest.approx(perplexity(reference, ids, CONTEXT, 8)["ppl"])
    assert "kl" not in result["reference"]["languages"]["t"]
    json.dumps(result)


def test_generation_agreement_counts_leading_matches_with_their_standard_error():
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    generated = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4], [0, 6, 7, 8]])  # prefixes 2, 4, 0; 10 of 12 tokens match
    result = generation_agreement(reference, generated)
    assert result["gen_prefix"] == 2.0 and result["gen_agree"] == 10 / 12 and result["gen_prompts"] == 3
    assert math.isclose(result["gen_prefix_se"], statistics.stdev([2, 4, 0]) / math.sqrt(3))
    assert math.isnan(generation_agreement(reference[:1], generated[:1])["gen_prefix_se"])


def test_window_longer_than_the_context_is_refused():
    with pytest.raises(UserError, match=f"maximum is {CONTEXT}"):
        evaluate(uniform_model(), byte_tokenizer(), texts={"t": ["text"]}, window=CONTEXT + 1)
    with pytest.raises(UserError, match=f"maximum is {CONTEXT}"):
        perplexity(uniform_model(), stream(40), CONTEXT + 1, 2)


def test_text_with_nothing_to_predict_is_refused():
    with pytest.raises(UserError, match="too short"):
        evaluate(uniform_model(), byte_tokenizer(), texts={"t": ["x"]})  # predicts only the end-of-text token


def test_models_with_different_vocabularies_are_not_compared():
    with pytest.raises(UserError, match="vocabulary"):
        compare(uniform_model(), uniform_model(V + 1), stream(20), CONTEXT, 2)


def test_table_has_one_aligned_row_per_model():
    original = {
        "languages": {"en": {"ppl": 12.3456, "bpb": 1.23456, "tokens": 9}},
        "tasks": {"hcsmoe_strategyqa": {"acc": 0.5}},
    }
    compressed = {
        "languages": {"en": {"ppl": 14.0, "bpb": 1.3, "tokens": 9, "kl": 0.123456, "top1": 0.9}},
        "tasks": {"hcsmoe_strategyqa": {"acc": 0.625, "acc_norm": 0.75}},
    }
    lines = format_table([("original", original), ("compressed", compressed)]).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["en", "hcsmoe_strategyqa"]
    assert lines[1].split() == ["model", "ppl", "bpb", "KL", "top1", "acc", "acc_norm"]
    assert lines[2].split() == ["original", "12.35", "1.235", "-", "-", "0.500", "-"]
    assert lines[3].split() == ["compressed", "14.00", "1.300", "0.1235", "0.900", "0.625", "0.750"]
    assert len({len(line) for line in lines[1:]}) == 1  # right-aligned under the labels


# ----------------------------------------------------------------------------- a real tiny MoE


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=CONTEXT, eos_token_id=0, bos_token_id=0, pad_token_id=0,
    )
    directory = tmp_path_factory.mktemp("tiny-moe")
    Qwen3MoeForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_moe(tiny_moe_dir) -> Qwen3MoeForCausalLM:
    return Qwen3MoeForCausalLM.from_pretrained(tiny_moe_dir).eval()


def test_tiny_moe_perplexity_matches_prefix_by_prefix_float64_loop(tiny_moe):
    ids = stream(30, seed=7)
    model64 = Qwen3MoeForCausalLM.from_pretrained(
        tiny_moe.name_or_path, dtype=torch.float64, experts_implementation="eager"  # grouped_mm has no float64
    ).eval()
    nll = 0.0
    with torch.no_grad():
        for i, t in predicted_positions(30, 12):
            prefix = ids[i - t : i]  # the window so far, nothing before it
            nll -= model64(input_ids=prefix[None]).logits[0, -1].log_softmax(-1)[ids[i]].item()
    result = perplexity(tiny_moe, ids, 12, 2)
    assert result["tokens"] == 30 - 3
    assert result["nll"] == pytest.approx(nll, rel=1e-4)


def test_cli_eval_prints_the_table_and_writes_json(capsys, tiny_moe_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("First paragraph of a small file.\n\nSecond paragraph, longer than the first.\n")
    model = str(tiny_moe_dir)
    code = main(["eval", model, "--reference", model, "--text", "notes.txt", "--json", "r.json"])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(Path("r.json").read_text())
    assert list(result["languages"]) == ["notes.txt"]
    metrics = result["languages"]["notes.txt"]
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["top1"] == 1.0
    assert result["reference"]["languages"]["notes.txt"]["ppl"] == pytest.approx(metrics["ppl"])
    assert f"{metrics['ppl']:.2f}" in printed and "(reference)" in printed and "notes.txt" in printed


def bad_eval_inputs(tmp_path: Path, model: Path) -> dict[str, tuple[list[str], str]]:
    """argv after `eval` and a phrase the error must contain, per bad input."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    bert = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    bert.save_pretrained(tmp_path / "bert")
    (tmp_path / "plain").mkdir()
    return {
        "not a model": ([str(tmp_path / "plain")], "not a model"),
        "BERT config": ([str(tmp_path / "bert")], "not a causal language model"),
        "text file missing": ([str(model), "--text", str(tmp_path / "missing.txt")], "not found"),
        "text file empty": ([str(model), "--text", str(empty)], "contains no text"),
        "window too large": ([str(model), "--window", str(CONTEXT + 1)], f"maximum is {CONTEXT}"),
    }


BAD_INPUTS = ["not a model", "BERT config", "text file missing", "text file empty", "window too large"]


def assert_one_line_error(code: int, err: str, message: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("hcsmoe: error:") and message in lines[0], err


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_eval_input_is_a_one_line_error(case, capsys, tmp_path, tiny_moe_dir):
    argv, message = bad_eval_inputs(tmp_path, tiny_moe_dir)[case]
    code = main(["eval", *argv, "--languages", "en", "--max-tokens", "64"])
    assert_one_line_error(code, capsys.readouterr().err, message)


@pytest.mark.parametrize("case", ["BERT config", "window too large"])  # a few only: each process takes seconds
def test_bad_eval_input_in_a_real_process_prints_one_line(case, tmp_path, tiny_moe_dir):
    argv, message = bad_eval_inputs(tmp_path, tiny_moe_dir)[case]
    process = subprocess.run(
        [sys.executable, "-m", "hcsmoe.cli", "eval", *argv, "--languages", "en", "--max-tokens", "64"],
        capture_output=True, text=True, timeout=180,
    )
    assert_one_line_error(process.returncode, process.stderr, message)


# ----------------------------------------------------------------------------- multiple choice (optional lm-eval)


def test_tasks_without_lm_eval_ask_for_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if not installed
    with pytest.raises(UserError, match=r"install hcsmoe\[eval\]"):
        run_tasks(uniform_model(), byte_tokenizer(), ["hcsmoe_strategyqa"])


def test_bundled_multiple_choice_task_matches_hand_scoring(tiny_moe):
    pytest.importorskip("lm_eval.models.huggingface")  # lm-eval with its [hf] extra (accelerate)
    tokenizer = byte_tokenizer()
    questions = [json.loads(line) for line in MC_FILE.read_text().splitlines()[1:5]]  # line 0 is the canary
    correct = correct_norm = 0
    with torch.no_grad():
        for q in questions:
            context = tokenizer.encode(f"Question: {q['question']}\nAnswer:")
            scores = []
            for choice in q["choices"]:
                continuation = tokenizer.encode(f" {choice}")
                ids = torch.tensor(context + continuation)
                log_probs = tiny_moe(input_ids=ids[None]).logits[0].double().log_softmax(-1)
                scores.append(sum(log_probs[len(context) + j - 1, c].item() for j, c in enumerate(continuation)))
            correct += max(range(len(scores)), key=scores.__getitem__) == q["answer"]
            normalized = [s / len(c) for s, c in zip(scores, q["choices"])]
            correct_norm += max(range(len(scores)), key=normalized.__getitem__) == q["answer"]
    result = run_tasks(tiny_moe, tokenizer, ["hcsmoe_strategyqa"], limit=4, batch_size=2)
    assert list(result) == ["hcsmoe_strategyqa"]
    metrics = result["hcsmoe_strategyqa"]
    assert (metrics["n"], metrics["acc"], metrics["acc_norm"]) == (4, correct / 4, correct_norm / 4)
    assert metrics["acc_stderr"] == pytest.approx(statistics.stdev([1.0] * correct + [0.0] * (4 - correct)) / 2)
