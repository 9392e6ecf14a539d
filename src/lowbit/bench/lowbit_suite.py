"""``lowbit demo --suite lowbit``: a BiBench-style grid of QAT quantizers × bit settings × models.

Every cell trains the workload's model with quantization-aware training and distillation from its fp32 original
(same seed, same budget for every cell), then measures it like any other recipe, so rows share the demo's schema.
Settings: W1A32 and W1A1 for the binarizers, W2A32 for the two-plane residual binarizer, W1.58A8 for the ternary
variants, W2A2 and W4A4 for LSQ / PACT / plain STE. The first and last layers keep 8-bit weights.

Example:
    >>> from lowbit.bench.lowbit_suite import suite_recipes
    >>> r = suite_recipes(epochs=1)["reste-W1A1"]
    >>> r.stages[0].options["weight_quantizer"], r.stages[0].options["act_quantizer"]
    ('reste', 'reste')
"""

from __future__ import annotations

from collections.abc import Sequence

from lowbit.errors import RecipeError
from lowbit.formats.spec import QuantSpec, suggest
from lowbit.recipe import Recipe, Stage

W1 = QuantSpec(kind="binary", bits=1, scale_method="absmean", granularity="channel")
W158 = QuantSpec(kind="ternary", bits=2, scale_method="absmean", granularity="tensor")
A1 = QuantSpec(kind="binary", bits=1, scale_method="none", granularity="token", dynamic=True)
A8 = QuantSpec(kind="int", bits=8, symmetric=True, granularity="token", dynamic=True)


def _int(bits: int, act: bool = False) -> QuantSpec:
    return QuantSpec(kind="int", bits=bits, symmetric=True, granularity="tensor" if act else "channel")


#: (row, setting, weight quantizer, act quantizer, weight format, act format)
CELLS: list[tuple[str, str, str, str | None, QuantSpec, QuantSpec | None]] = [
    *[
        (b, s, b, a, W1, af)
        for b in ("bnn", "xnor", "bireal", "reste", "biper")
        for s, a, af in (("W1A32", None, None), ("W1A1", b, A1))
    ],
    ("react", "W1A1", "xnor", "react", W1, A1),
    ("two_plane", "W2A32", "two_plane", None, _int(2), None),
    *[(t, "W1.58A8", t, "int8_token", W158, A8) for t in ("ternary", "ternary_absmedian", "ternary_tbt")],
    ("lsq", "W2A2", "lsq", "lsq", _int(2), _int(2, act=True)),
    ("lsq", "W4A4", "lsq", "lsq", _int(4), _int(4, act=True)),
    ("pact", "W4A4", "lsq", "pact", _int(4), _int(4, act=True)),
    ("ste", "W4A4", "ste", "lsq", _int(4), _int(4, act=True)),
]


def suite_recipes(
    epochs: int = 30, lr: float = 2e-3, batch_size: int = 64, seed: int = 0, device: str = "cpu"
) -> dict[str, Recipe]:
    """One QAT recipe per cell, named ``<row>-<setting>`` (``device="cuda"`` trains on a GPU)."""
    out = {}
    for row, setting, wq, aq, wspec, aspec in CELLS:
        options = {
            "weight_quantizer": wq,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "seed": seed,
            "loss": "kd",
            "alpha": 0.5,
            "temperature": 2.0,
        }
        if aq is not None:
            options["act_quantizer"] = aq
        if device != "cpu":
            options["device"] = device
        name = f"{row}-{setting}"
        out[name] = Recipe(
            name=name,
            description=f"QAT {row} at {setting}",
            stages=(Stage(method="qat", weights=wspec, activations=aspec, options=options),),
        )
    return out


def select_cells(recipes: dict[str, Recipe], names: Sequence[str] | None) -> list[Recipe]:
    """The suite's recipes named in ``names`` (all of them when ``names`` is empty), in the order given.

    Example:
        >>> [r.name for r in select_cells(suite_recipes(epochs=1), ["lsq-W4A4", "reste-W1A1"])]
        ['lsq-W4A4', 'reste-W1A1']
    """
    if not names:
        return list(recipes.values())
    unknown = [n for n in names if n not in recipes]
    if unknown:
        raise RecipeError(
            f"unknown cell {unknown[0]!r} of --suite lowbit{suggest(unknown[0], list(recipes))}; "
            f"cells are named <row>-<setting>, e.g. {', '.join(list(recipes)[:3])}"
        )
    return [recipes[n] for n in names]
