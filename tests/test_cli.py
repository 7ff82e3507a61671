"""The command line: every bad input is one line on stderr, a non-zero exit and nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

from hcsmoe.cli import main
from hcsmoe.fitting.expert_fit import HISTORY, SHORT_HISTORY


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str) -> None:
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err


@pytest.fixture
def dense_model(tmp_path) -> Path:
    directory = tmp_path / "llama"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(directory)
    return directory


def bad_inputs(tiny: Path, tmp_path: Path, dense: Path) -> dict[str, list[str]]:
    short = tmp_path / "short.txt"
    inside = tiny / "compressed"
    return {
        "K equal to E": [str(tiny), "-k", "8"],
        "K above E": [str(tiny), "-k", "9"],
        "K below top-k": [str(tiny), "-k", "1"],
        "K zero": [str(tiny), "-k", "0"],
        "K negative": [str(tiny), "-k", "-2"],
        "ratio one": [str(tiny), "--ratio", "1"],
        "ratio zero": [str(tiny), "--ratio", "0"],
        "ratio not a number": [str(tiny), "--ratio", "half"],
        "unknown method": [str(tiny), "-k", "4", "--method", "magic"],
        "unknown linkage": [str(tiny), "-k", "4", "--method", "hc-smoe", "--linkage", "median"],
        "ward with cosine": [str(tiny), "-k", "4", "--method", "hc-smoe", "--linkage", "ward", "--metric", "cosine"],
        "option of another method": [str(tiny), "-k", "4", "--linkage", "ward"],
        "refit with a statistics file": [str(tiny), "-k", "4", "--stats", str(tmp_path / "stats.safetensors")],
        "unknown router": [str(tiny), "-k", "4", "--router", "best"],
        "calibration shorter than a block": [str(tiny), "-k", "4", "--calibration", str(short)],
        "calibration file missing": [str(tiny), "-k", "4", "--calibration", str(tmp_path / "none.txt")],
        "calibration with an empty part": [str(tiny), "-k", "4", "--calibration", "wiki:en+"],
        "sampled calibration while streaming": [str(tiny), "-k", "4", "--stream", "--calibration", "wiki:en+self"],
        "model missing": [str(tmp_path / "no-such-model"), "-k", "4"],
        "not a MoE model": [str(dense), "-k", "4"],
        "output inside input": [str(tiny), "-k", "4", "--out", str(inside)],
    }


CASES = list(bad_inputs(Path("t"), Path("t"), Path("t")))


@pytest.mark.parametrize("case", CASES)
def test_bad_compress_input(capsys, tiny_models, tmp_path, dense_model, case):
    tiny = tiny_models["qwen3_moe"]
    (tmp_path / "short.txt").write_text("Only a few words.")
    before = sorted(p.name for p in tiny.iterdir())
    argv = bad_inputs(tiny, tmp_path, dense_model)[case]
    if "--stats" in argv:  # a real statistics file, so that the refusal is the refit's
        from hcsmoe.pipeline import compress

        compress(tiny, num_experts=4, method="hc-smoe", num_blocks=2, block_size=32, progress=False).stats.save(
            tmp_path / "stats.safetensors")
        before = sorted(p.name for p in tiny.iterdir())
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    code, _, err = run_cli(capsys, "compress", *argv, "--no-eval", "-q", "--blocks", "2", "--block-size", "32")
    assert_one_line_error(code, err)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tiny.iterdir()) == before
    assert not any(p.name.startswith(".") for p in list(tmp_path.iterdir()) + list(tiny.iterdir()))
    if "--stats" in argv:
        assert "--no-refit" in err


def test_nonempty_output_needs_overwrite(capsys, tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    args = ["compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--out", str(out), "--no-eval", "-q",
            "--blocks", "2", "--block-size", "32"]
    code, _, err = run_cli(capsys, *args)
    assert_one_line_error(code, err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    code, _, _ = run_cli(capsys, *args, "--overwrite")
    assert code == 0 and (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_recipe_yaml_and_flags(capsys, tiny_models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tiny_models['olmoe']}\nmethod: hc-smoe\nexperts: 3\nlinkage: complete\nblocks: 2\n"
                      "block-size: 32\neval: false\n")
    code, _, err = run_cli(capsys, "compress", "--config", str(recipe), "--out", str(tmp_path / "o"), "-q", "--linkage", "single")
    assert code == 0, err
    plan = json.loads((tmp_path / "o" / "hcsmoe_plan.json").read_text())
    assert plan["options"]["linkage"] == "single" and len(plan["layers"][0]["groups"]) == 3
    recipe.write_text("experts: 3\ncolour: blue\n")
    code, _, err = run_cli(capsys, "compress", "--config", str(recipe), "--out", str(tmp_path / "p"))
    assert_one_line_error(code, err)


def test_a_long_job_estimates_its_time_after_the_first_layer(capsys, tiny_models, tmp_path):
    """After the first MoE layer, one stderr line: that layer's stage times, the whole run's estimate and what
    --fast would take instead (the default fits the experts); --fast has no expert fit to leave out; -q says
    nothing."""
    common = ("compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--blocks", "2", "--block-size", "32", "--no-eval")
    code, _, err = run_cli(capsys, *common, "--out", str(tmp_path / "a"))
    lines = [line for line in err.splitlines() if "the first MoE layer took" in line]
    assert code == 0 and len(lines) == 1, err
    assert "expert fit" in lines[0] and "for all 2 MoE layers" in lines[0] and "with --fast" in lines[0]
    code, _, err = run_cli(capsys, *common, "--fast", "--out", str(tmp_path / "b"))
    line = next(line for line in err.splitlines() if "the first MoE layer took" in line)
    assert code == 0 and "expert fit" not in line and "--fast" not in line
    code, _, err = run_cli(capsys, *common, "-q", "--out", str(tmp_path / "c"))
    assert code == 0 and "first MoE layer" not in err
    plans = [json.loads((tmp_path / name / "hcsmoe_plan.json").read_text()) for name in "abc"]
    assert [plan["refit"]["steps"] for plan in plans] == [30, 0, 30]
    assert [plan["recipe"]["fast"] for plan in plans] == [False, True, False]


def test_refit_flags_reach_the_plan(capsys, tiny_models, tmp_path):
    """--refit-steps, --refit-tokens, --no-refit-whiten, --refit-anchor, --choose-fitted and --refit-memory tune
    the default recipe's refit (its other options kept) and are recorded; the expert fit is whitened, not
    anchored and fits a small layer whole unless told otherwise."""
    for extra, whitened, anchor in (([], True, 0.0), (["--no-refit-whiten"], False, 0.0),
                                    (["--refit-anchor", "0.5", "--choose-fitted", "--refit-memory", "1e-9"], True, 0.5)):
        out = tmp_path / f"o{whitened}{anchor}"
        code, _, err = run_cli(capsys, "compress", str(tiny_models["qwen3_moe"]), "-k", "4", "--blocks", "2",
                               "--block-size", "32", "--no-eval", "-q", "--refit-steps", "3", "--refit-tokens", "40",
                               *extra, "--out", str(out))
        assert code == 0, err
        plan = json.loads((out / "hcsmoe_plan.json").read_text())
        assert plan["refit"]["steps"] == 3 and plan["refit"]["step_tokens"] == 40 and plan["refit"]["alpha"] == 0.01
        assert plan["refit"]["whiten"] is whitened and plan["refit"]["anchor"] == anchor
        assert plan["refit"]["choose_fitted"] is bool(anchor) and plan["refit"]["memory"] == (1e-9 if anchor else 8)
        reports = [layer["details"]["refit"]["experts"] for layer in plan["layers"]]
        history, groups = (SHORT_HISTORY, 4) if anchor else (HISTORY, 1)  # 4 experts kept, each a group of its own
        assert all(report | {"error_before": 0, "error_after": 0, "evaluations": 0} ==
                   {"steps": 3, "tokens": 40, "whitened": whitened, "anchor": anchor, "history": history,
                    "groups": groups, "error_before": 0, "error_after": 0, "evaluations": 0} for report in reports)
        assert all(report["evaluations"] >= 1 for report in reports)


def test_inspect_shows_layout(capsys, tiny_models):
    code, out, _ = run_cli(capsys, "inspect", str(tiny_models["qwen2_moe"]), "--json")
    info = json.loads(out)
    assert code == 0 and info["experts_per_layer"] == 8 and info["top_k"] == 2 and info["moe_layers"] == [0, 1]
    assert info["shared_modules"] == ["mlp.shared_expert", "mlp.shared_expert_gate"]
    assert info["expert_tensors"] == {"mlp.experts.gate_up_proj": [8, 32, 32], "mlp.experts.down_proj": [8, 32, 16]}


def test_unsupported_architecture_names_the_supported_list(capsys, dense_model):
    code, _, err = run_cli(capsys, "inspect", str(dense_model))
    assert_one_line_error(code, err)
    assert "llama" in err and "Mixtral" in err and "Qwen3-MoE" in err


def test_real_process_prints_no_traceback(tiny_models, tmp_path):
    process = subprocess.run(
        [sys.executable, "-m", "hcsmoe.cli", "compress", str(tiny_models["mixtral"]), "-k", "99", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert process.returncode == 2
    assert_one_line_error(process.returncode, process.stderr)


def test_example_recipe_is_valid():
    from hcsmoe.cli.compress import read_recipe

    recipe = read_recipe(str(Path(__file__).parent.parent / "examples" / "recipe.yaml"))
    assert recipe["method"] == "hc-smoe" and recipe["ratio"] == 0.5 and recipe["block_size"] == 2048


def test_two_runs_with_one_output_exactly_one_wins(tiny_models, tmp_path):
    """Two compress runs started together with the same --out: one succeeds, the other exits non-zero with a
    one-line error; the directory holds the winner's model and nothing else is left behind."""
    import os
    import subprocess
    import sys

    out = tmp_path / "shared-out"
    runs = [subprocess.Popen([sys.executable, "-m", "hcsmoe", "compress", str(tiny_models["olmoe"]), "-k", str(k),
                              "--method", "hc-smoe", "--out", str(out), "--no-eval", "-q", "--blocks", "2",
                              "--block-size", "32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
            for k in (6, 5)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    winners = [k for (code, _), k in zip(results, (6, 5)) if code == 0]
    assert len(winners) == 1, results
    loser_code, loser_err = next(r for r in results if r[0] != 0)
    assert_one_line_error(loser_code, "\n".join(l for l in loser_err.splitlines() if "warn" not in l.lower()))
    assert json.loads((out / "config.json").read_text())["num_experts"] == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared-out"]


def test_final_rename_refuses_an_output_that_appeared_meanwhile(tmp_path):
    """The last line of defence: the other run renamed its output into place after this run's checks."""
    from hcsmoe.errors import UserError
    from hcsmoe.checkpoints.saving import atomic_directory

    out = tmp_path / "out"
    with pytest.raises(UserError, match="another run"):
        with atomic_directory(out) as directory:
            (directory / "config.json").write_text("{}")
            out.mkdir()
            (out / "config.json").write_text('{"winner": true}')
    assert json.loads((out / "config.json").read_text()) == {"winner": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_directory(out, overwrite=True) as directory:  # --overwrite replaces it whole
        (directory / "config.json").write_text('{"second": true}')
    assert json.loads((out / "config.json").read_text()) == {"second": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_busy_machine_is_told_how_to_share_it(capsys, monkeypatch):
    from hcsmoe.distributed import warn_if_busy

    monkeypatch.delenv("HCSMOE_IGNORE_LOAD")
    assert warn_if_busy(2, load=5.0)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "load average 5.0 on 2 cores" in err and "--threads 1" in err
    assert not warn_if_busy(2, load=1.5) and capsys.readouterr().err == ""


def test_the_evaluation_that_does_not_fit_is_skipped_in_one_line_after_saving(capsys, tiny_models, tmp_path,
                                                                            monkeypatch):
    """A model too large for the before/after evaluation: the compressed model is saved, the evaluation is
    skipped with one line saying how to run it elsewhere, and the command exits 0 instead of being killed."""
    monkeypatch.setattr("hcsmoe.runners.streaming.available_memory", lambda: 1000)  # bytes: nothing fits
    out = tmp_path / "o"
    code, _, err = run_cli(capsys, "compress", str(tiny_models["olmoe"]), "-k", "4", "--method", "hc-smoe", "-q",
                           "--out", str(out), "--blocks", "2", "--block-size", "32")
    skipped = [line for line in err.splitlines() if "evaluation" in line]
    assert code == 0 and len(skipped) == 1 and "skipped" in skipped[0] and f"hcsmoe eval {out}" in skipped[0]
    assert (out / "config.json").is_file() and "## Evaluation" not in (out / "README.md").read_text()


def test_the_expert_fits_memory_counts_in_the_choice_to_stream(capsys, tiny_models, tmp_path, monkeypatch):
    """Free memory for the in-memory path but not for the default's expert fit on top: the default streams and
    says why; --fast, which has no expert fit, stays in memory."""
    from hcsmoe.checkpoints.shards import safetensors_bytes
    from hcsmoe.cli.compress import IN_MEMORY_FACTOR, fit_memory
    from hcsmoe.recipe import Recipe

    source = tiny_models["olmoe"]
    fit = fit_memory(source, Recipe.from_options({"experts": 4}))
    assert 0 < fit < 8 * 2**30 and fit_memory(source, Recipe.from_options({"experts": 4, "fast": True})) == 0
    free = IN_MEMORY_FACTOR * safetensors_bytes(source) + fit // 2
    monkeypatch.setattr("hcsmoe.runners.streaming.available_memory", lambda: free)
    common = ["-k", "4", "--no-eval", "-q", "--blocks", "2", "--block-size", "32"]
    code, out, err = run_cli(capsys, "compress", str(source), *common, "--refit-steps", "2", "--out", str(tmp_path / "o"))
    assert code == 0 and "streaming it one layer at a time" in err and "expert fit" in err, err
    assert json.loads(out.strip().splitlines()[-1])["seconds"].keys() == {"total"}  # the streaming path's timings
    code, out, err = run_cli(capsys, "compress", str(source), *common, "--fast", "--out", str(tmp_path / "p"))
    assert code == 0 and "streaming" not in err and "total" not in json.loads(out.strip().splitlines()[-1])["seconds"]


def test_a_model_too_large_for_free_memory_is_streamed(capsys, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr("hcsmoe.runners.streaming.available_memory", lambda: 1000)  # bytes: nothing fits
    code, out, err = run_cli(capsys, "compress", str(tiny_models["olmoe"]), "-k", "4", "--method", "hc-smoe",
                             "--out", str(tmp_path / "o"), "--no-eval", "-q", "--blocks", "2", "--block-size", "32")
    assert code == 0 and "streaming it one layer at a time" in err and len(err.strip().splitlines()) == 1
    assert json.loads(out.strip().splitlines()[-1])["seconds"].keys() == {"total"}  # the streaming path's timings
    code, out, err = run_cli(capsys, "compress", str(tiny_models["olmoe"]), "-k", "4", "--method", "hc-smoe",
                             "--out", str(tmp_path / "p"), "--no-eval", "-q", "--blocks", "2", "--block-size", "32",
                             "--no-stream")
    assert code == 0 and "streaming" not in err
