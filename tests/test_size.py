"""A size the user asks for (--size F): the grid of shapes holding at most F of the routed experts' neurons, the
shape with the lowest held-out error chosen, and the checkpoint the same as asking for that shape directly."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hcsmoe.apply.narrow import WIDTH_MULTIPLE
from hcsmoe.pipeline import compress
from hcsmoe.sizing import GRID_POINTS, shape_grid
from tests.test_cli import assert_one_line_error, run_cli
from tests.test_compress import FAST


@pytest.mark.parametrize("experts, width, fraction, top_k", [(32, 64, 0.5, 4), (60, 48, 0.5, 4), (8, 14336, 0.5, 2),
                                                             (128, 768, 0.75, 8), (8, 16, 0.5, 2)])
def test_every_shape_of_the_grid_fits_the_budget_with_as_many_neurons_as_it_allows(experts, width, fraction, top_k):
    """Widths in multiples of 8 (what engines' grouped kernels need) or all I; the fewest experts keep every
    neuron; a width appears once, with the most experts the budget allows it."""
    grid = shape_grid(experts, width, fraction, top_k)
    budget = fraction * experts * width
    counts, widths = [k for k, _ in grid], [n for _, n in grid]
    assert counts == sorted(set(counts)) and widths == sorted(set(widths), reverse=True) and len(grid) <= GRID_POINTS
    assert grid[0] == (max(math.ceil(fraction * experts), top_k), width) and counts[-1] == experts
    for k, neurons in grid:
        assert k * neurons <= budget and (neurons == width or neurons % WIDTH_MULTIPLE == 0)
        assert neurons == width or k * (neurons + WIDTH_MULTIPLE) > budget


def test_size_chooses_the_shape_with_the_lowest_held_out_error_and_writes_what_that_shape_writes(tiny_models):
    source = tiny_models["qwen3_moe"]
    sized = compress(source, size=0.5, **FAST)
    record = sized.plan.size
    assert record["fraction"] == 0.5 and [(t["experts"], t["width"]) for t in record["grid"]] == shape_grid(8, 16, 0.5, 2)
    best = min(record["grid"], key=lambda t: t["held_out_error"])
    assert record["chosen"] == {"experts": best["experts"], "width": best["width"]}
    assert len({t["held_out_error"] for t in record["grid"]}) == len(record["grid"])  # the shapes differ
    assert all(len(layer.groups) == best["experts"] for layer in sized.plan.layers)
    direct = compress(source, num_experts=best["experts"], width=best["width"] if best["width"] < 16 else None, **FAST)
    for name, tensor in direct.model.state_dict().items():
        assert torch.equal(tensor, sized.model.state_dict()[name]), name


def test_the_cli_saves_the_sized_model_and_its_grid(capsys, tiny_models, tmp_path):
    code, _, err = run_cli(capsys, "compress", str(tiny_models["mixtral"]), "--size", "0.5", "--no-eval", "--fast",
                           "--blocks", "2", "--block-size", "32", "--out", str(tmp_path / "o"))
    assert code == 0, err
    plan = json.loads((tmp_path / "o" / "hcsmoe_plan.json").read_text())
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    chosen = plan["size"]["chosen"]
    assert config["num_local_experts"] == chosen["experts"] and config["intermediate_size"] == chosen["width"]
    assert err.count("--size 0.5:") == len(plan["size"]["grid"])  # one line per shape tried


@pytest.mark.parametrize("extra, message", [(["--size", "1.5"], "in (0, 1)"), (["--size", "0.5", "-k", "4"], "alone"),
                                            (["--size", "0.5", "--stream"], "in memory"),
                                            (["--size", "0.5", "--method", "reap"], "drop --method")])
def test_size_refusals(capsys, tiny_models, tmp_path, extra, message):
    code, _, err = run_cli(capsys, "compress", str(tiny_models["qwen3_moe"]), *extra, "--no-eval", "--out",
                           str(tmp_path / "o"))
    assert code == 2 and message in err, err
    assert_one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_deepseek_is_refused_in_one_line(tiny_models):
    with pytest.raises(Exception, match="shared experts"):
        compress(tiny_models["deepseek_v3"], size=0.5, **FAST)
