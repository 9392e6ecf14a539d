"""QuantSpec validation and serialisation."""

from __future__ import annotations

import pytest

from lowbit.errors import RecipeError
from lowbit.formats import ACT_FORMATS, FORMATS, QuantSpec, get_format


@pytest.mark.parametrize("name", sorted({**FORMATS, **ACT_FORMATS}))
def test_dict_roundtrip(name: str) -> None:
    spec = get_format(name)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.label()


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_int_bits_out_of_range(bits: int) -> None:
    with pytest.raises(RecipeError, match=f"bits={bits} is out of range"):
        QuantSpec(kind="int", bits=bits)


def test_unknown_key_suggests_fix() -> None:
    with pytest.raises(RecipeError, match="did you mean 'group_size'"):
        QuantSpec.from_dict({"kind": "int", "bits": 4, "granularity": "group", "grup_size": 128})


def test_unknown_kind_and_fp_format() -> None:
    with pytest.raises(RecipeError, match="did you mean 'ternary'"):
        QuantSpec.from_dict({"kind": "ternery"})
    with pytest.raises(RecipeError, match="fp format"):
        QuantSpec.from_dict({"kind": "fp", "fp_format": "e9m9", "bits": 8})


def test_group_needs_size() -> None:
    with pytest.raises(RecipeError, match="group_size"):
        QuantSpec(kind="int", bits=4, granularity="group")


def test_per_kind_defaults() -> None:
    assert QuantSpec.from_dict({"kind": "ternary"}).bits == 2
    assert QuantSpec.from_dict({"kind": "binary"}).bits == 1
    assert QuantSpec.from_dict({"kind": "fp", "fp_format": "e2m1"}).bits == 4
    assert QuantSpec.from_dict({"kind": "ternary"}).effective_code_bits == 1.58
