"""Named weight formats: the registry tests iterate over, so every new format is tested for free.

Example:
    >>> from lowbit.formats.registry import FORMATS, get_format
    >>> get_format("int4_g128").label()
    'int4 asym g128'
    >>> "ternary_absmean" in FORMATS
    True
"""

from __future__ import annotations

from lowbit.errors import RecipeError
from lowbit.formats.spec import QuantSpec, suggest


def _int(bits: int, symmetric: bool, granularity: str = "channel", group_size: int | None = None) -> QuantSpec:
    return QuantSpec(
        kind="int",
        bits=bits,
        symmetric=symmetric,
        granularity=granularity,  # type: ignore[arg-type]
        group_size=group_size,
    )


FORMATS: dict[str, QuantSpec] = {
    "int8": _int(8, True),
    "int8_asym": _int(8, False),
    "int8_tensor": _int(8, True, "tensor"),
    "int6": _int(6, True),
    "int4": _int(4, True),
    "int4_g32": _int(4, False, "group", 32),
    "int4_g128": _int(4, False, "group", 128),
    "int4_sym_g128": _int(4, True, "group", 128),
    "int3_g64": _int(3, False, "group", 64),
    "int2_g64": _int(2, False, "group", 64),
    "int2": _int(2, False),
    "fp8_e4m3": QuantSpec(kind="fp", bits=8, fp_format="e4m3", granularity="channel"),
    "fp8_e5m2": QuantSpec(kind="fp", bits=8, fp_format="e5m2", granularity="channel"),
    "fp6_e3m2": QuantSpec(kind="fp", bits=6, fp_format="e3m2", granularity="channel"),
    "fp6_e2m3": QuantSpec(kind="fp", bits=6, fp_format="e2m3", granularity="channel"),
    "fp4_e2m1": QuantSpec(kind="fp", bits=4, fp_format="e2m1", granularity="group", group_size=32),
    "ternary_absmean": QuantSpec(kind="ternary", bits=2, scale_method="absmean", granularity="tensor"),
    "ternary_absmedian": QuantSpec(kind="ternary", bits=2, scale_method="absmedian", granularity="tensor"),
    "ternary_tbt": QuantSpec(kind="ternary", bits=2, scale_method="tbt", granularity="channel"),
    "binary": QuantSpec(kind="binary", bits=1, scale_method="absmean", granularity="channel"),
    "binary_sign": QuantSpec(kind="binary", bits=1, scale_method="none", granularity="tensor"),
}

#: Activation formats.
ACT_FORMATS: dict[str, QuantSpec] = {
    "int8_token": QuantSpec(kind="int", bits=8, symmetric=True, granularity="token", dynamic=True),
    "int8_static": QuantSpec(kind="int", bits=8, symmetric=False, granularity="tensor"),
    "int4_token": QuantSpec(kind="int", bits=4, symmetric=True, granularity="token", dynamic=True),
    "fp8_token": QuantSpec(kind="fp", bits=8, fp_format="e4m3", granularity="token", dynamic=True),
    "binary_token": QuantSpec(kind="binary", bits=1, scale_method="absmean", granularity="token", dynamic=True),
}


def get_format(name: str) -> QuantSpec:
    """Look up a named weight or activation format."""
    table = {**FORMATS, **ACT_FORMATS}
    if name not in table:
        raise RecipeError(f"unknown format '{name}'{suggest(name, list(table))}; known: {', '.join(table)}")
    return table[name]
