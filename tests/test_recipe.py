"""One Recipe: the CLI flags, the YAML file, the Python keywords and the plan all give the same one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from hcsmoe import Recipe, compress
from hcsmoe.cli.compress import COMPRESS_DEFAULTS, read_recipe
from hcsmoe.errors import UserError
from hcsmoe.fitting.refit import RefitOptions
from hcsmoe.fitting.router_fit import RouterFitOptions
from hcsmoe.recipe import DEFAULT_REFIT, DEFAULT_ROUTER_FIT, FAST_REFIT

EXAMPLE = Path(__file__).parent.parent / "examples" / "recipe.yaml"
TINY = dict(num_blocks=2, block_size=32, progress=False)


def test_yaml_file_and_python_give_the_same_recipe():
    options = dict(COMPRESS_DEFAULTS) | read_recipe(str(EXAMPLE))
    assert Recipe.from_options(options) == Recipe(
        ratio=0.5, method="hc-smoe", linkage="average", metric="euclidean", representation="expert-output",
        merge="frequency", router="dominant", calibration="wiki:en,fr,es", blocks=32, block_size=2048, seed=0)


def test_refit_flags_tune_the_default_refit_and_no_refit_turns_it_off():
    base = dict(COMPRESS_DEFAULTS)
    assert Recipe.from_options(base | {"refit_steps": 7}).refit == dataclasses.replace(DEFAULT_REFIT, steps=7)
    assert Recipe.from_options(base | {"method": "reap", "refit_alpha": 0.5}).refit == RefitOptions(alpha=0.5)
    assert Recipe.from_options(base | {"refit": False, "refit_steps": 7}).refit is False
    assert Recipe.from_options(base | {"sequential": "on"}).sequential is True


def test_resolution_default_recipe_versus_named_method():
    default = Recipe().resolved()
    assert (default.refit, default.router_fit, default.sequential) == (DEFAULT_REFIT, DEFAULT_ROUTER_FIT, "corrective")
    named = Recipe(method="hc-smoe").resolved()
    assert (named.refit, named.router_fit, named.sequential) == (None, None, False)
    asked = Recipe(method="reap", refit=True, router_fit=True).resolved()
    assert (asked.refit, asked.router_fit) == (RefitOptions(), RouterFitOptions())
    assert Recipe().resolved(replanning=True).sequential is False
    assert Recipe(fast=True).resolved().refit == FAST_REFIT and FAST_REFIT.steps == 0 < DEFAULT_REFIT.steps
    assert Recipe.from_options(dict(COMPRESS_DEFAULTS) | {"fast": True, "refit_alpha": 0.1}).refit == RefitOptions(alpha=0.1)


@pytest.mark.parametrize("bad, message", [
    (dict(experts=4, ratio=0.5), "either --experts or --ratio"),
    (dict(ratio=1.5), "must lie in"),
    (dict(router="nearest"), "unknown router"),
    (dict(sequential="sometimes"), "unknown sequential"),
])
def test_a_bad_recipe_is_refused_when_made(bad, message):
    with pytest.raises(UserError, match=message):
        Recipe(**bad)


def test_keywords_and_recipe_object_compress_alike_and_the_plan_records_the_recipe(tiny_models):
    recipe = Recipe(experts=4, method="hc-smoe", blocks=2, block_size=32)
    by_object = compress(tiny_models["qwen3_moe"], recipe, progress=False)
    by_keywords = compress(tiny_models["qwen3_moe"], num_experts=4, method="hc-smoe", **TINY)
    for name, tensor in by_object.model.state_dict().items():
        assert torch.equal(tensor, by_keywords.model.state_dict()[name]), name
    assert by_object.plan.recipe == recipe.resolved().to_dict()
    assert by_object.plan.recipe["method"] == "hc-smoe" and by_object.plan.recipe["refit"] is None
    with pytest.raises(TypeError, match="num_expert"):
        compress(tiny_models["qwen3_moe"], num_expert=4)
