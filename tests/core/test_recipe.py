"""Recipes: presets, YAML round trip, one-line validation errors."""

from __future__ import annotations

import pytest

from lowbit.errors import RecipeError
from lowbit.recipe import DEMO_PRESETS, PRESETS, Recipe, get_preset, load_recipe


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_yaml(name: str) -> None:
    r = get_preset(name)
    assert Recipe.from_yaml(r.to_yaml()) == r


def test_demo_presets_exist() -> None:
    assert all(p in PRESETS for p in DEMO_PRESETS)


def test_yaml_file(tmp_path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("""
version: 1
name: mine
stages:
  - method: rtn
    weights: {kind: int, bits: 4, symmetric: false, granularity: group, group_size: 64}
    ignore: ["head"]
    overrides:
      - {pattern: "fc1", weights: int8}
""")
    r = load_recipe(p)
    assert r.name == "mine" and r.stages[0].weights.group_size == 64
    assert r.stages[0].overrides[0].weights.bits == 8


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stages: [{method: rtn, wieghts: int8}]", "unknown key 'wieghts'.*did you mean 'weights'"),
        ("stages: [{method: rnt, weights: int8}]", "unknown method 'rnt'.*did you mean 'rtn'"),
        ("stages: [{method: rtn, weights: {kind: int, bits: 0}}]", "bits=0 is out of range"),
        ("stages: [{method: rtn, weights: {kind: int, bits: 9}}]", "bits=9 is out of range"),
        ("stages: []", "non-empty list"),
        ("stages: [{method: rtn, weights: int8, targets: ['(']}]", "invalid regex"),
        ("stages: [{method: rtn}]", "quantizes nothing"),
        ("version: 7\nstages: [{method: rtn, weights: int8}]", "version 7"),
        ("stages: [{method: rtn, weights: int8, calibrator: kl2}]", "unknown calibrator"),
        (": : :", "not valid YAML"),
    ],
)
def test_validation_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        Recipe.from_yaml(text)


def test_unknown_preset_and_missing_file() -> None:
    with pytest.raises(RecipeError, match="did you mean 'w4g128'"):
        load_recipe("w4g12")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe("nothere.yaml")


def test_method_variant_name() -> None:
    with pytest.raises(RecipeError, match="unknown method"):
        get_preset("w4g128-nosuchmethod")
