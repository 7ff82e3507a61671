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
from tests.test_streaming import SMALL, assert_same_checkpoint


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


def test_a_streamed_size_probes_by_streaming_and_writes_the_in_memory_bits(tiny_models, tmp_path):
    """The probes stream too (for models larger than memory): the same errors, the same choice, the same
    checkpoint, and no probe left beside the output."""
    in_memory = compress(tiny_models["qwen3_moe"], size=0.5, **SMALL)
    in_memory.save(tmp_path / "memory")
    streamed = compress(tiny_models["qwen3_moe"], size=0.5, stream_to=tmp_path / "stream", **SMALL)
    assert streamed.plan.size["grid"] == in_memory.plan.size["grid"]
    assert_same_checkpoint(tmp_path / "stream", tmp_path / "memory")
    saved = json.loads((tmp_path / "stream" / "hcsmoe_plan.json").read_text())
    assert saved["size"]["chosen"] == in_memory.plan.size["chosen"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "stream"]


@pytest.mark.parametrize("extra, message", [(["--size", "1.5"], "in (0, 1)"), (["--size", "0.5", "-k", "4"], "alone"),
                                            (["--size", "0.5", "--method", "reap"], "drop --method")])
def test_size_refusals(capsys, tiny_models, tmp_path, extra, message):
    code, _, err = run_cli(capsys, "compress", str(tiny_models["qwen3_moe"]), *extra, "--no-eval", "--out",
                           str(tmp_path / "o"))
    assert code == 2 and message in err, err
    assert_one_line_error(code, err)
    assert not (tmp_path / "o").exists()


def test_where_experts_cannot_narrow_the_size_is_a_count_of_experts(tiny_models):
    """Llama 4's shared expert reads the routed experts' width key: --size keeps F*E whole experts, no probes."""
    sized = compress(tiny_models["llama4_text"], size=0.5, **FAST)
    assert sized.plan.size["grid"] == [] and sized.plan.size["chosen"] == {"experts": 4, "width": None}
    assert sized.plan.size["neurons"] is None and sized.plan.width is None
    direct = compress(tiny_models["llama4_text"], num_experts=4, **FAST)
    for name, tensor in direct.model.state_dict().items():
        assert torch.equal(tensor, sized.model.state_dict()[name]), name


def test_the_default_is_size_one_half_unless_the_shape_is_given(tiny_models):
    from hcsmoe.recipe import Recipe

    assert Recipe().size_to_choose() == 0.5 and Recipe(size=0.75).size_to_choose() == 0.75
    assert Recipe().size_to_choose(with_plan=True) is None and Recipe().size_to_choose(with_stats=True) is None
    for given in (dict(experts=4), dict(ratio=0.25), dict(width=0.5), dict(method="hc-smoe")):
        assert Recipe(**given).size_to_choose() is None, given
    default = compress(tiny_models["mixtral"], **FAST)
    assert default.plan.size["fraction"] == 0.5 and len(default.plan.size["grid"]) > 1
