"""`QuantSpec`: one typed description of every number format lowbit knows.

A spec says *what* a tensor is stored as — integers of 2–8 bits, a low-bit float, ternary or binary — and at
which granularity its scales are shared (one per tensor, per output channel, per group of input columns, or per
token at run time). It says nothing about *how* the codes were chosen (RTN, GPTQ, ...): that is a method's job.

Example:
    >>> from lowbit.formats.spec import QuantSpec
    >>> s = QuantSpec(kind="int", bits=4, symmetric=False, granularity="group", group_size=128)
    >>> s.label()
    'int4 asym g128'
    >>> QuantSpec.from_dict(s.to_dict()) == s
    True
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from lowbit.errors import RecipeError

Kind = Literal["int", "fp", "ternary", "binary"]
Granularity = Literal["tensor", "channel", "group", "token"]

KINDS: tuple[str, ...] = ("int", "fp", "ternary", "binary")
GRANULARITIES: tuple[str, ...] = ("tensor", "channel", "group", "token")
#: Low-bit float layouts: name -> (exponent bits, mantissa bits).
FP_LAYOUTS: dict[str, tuple[int, int]] = {
    "e4m3": (4, 3),
    "e5m2": (5, 2),
    "e3m2": (3, 2),
    "e2m3": (2, 3),
    "e2m1": (2, 1),
}
TERNARY_SCALES: tuple[str, ...] = ("absmean", "absmedian", "tbt")
BINARY_SCALES: tuple[str, ...] = ("absmean", "none")


def suggest(name: str, options: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or ''."""
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


@dataclass(frozen=True)
class QuantSpec:
    """A number format plus the granularity of its scales.

    Attributes:
        kind: ``int`` (2–8 bits), ``fp`` (low-bit float, see ``fp_format``), ``ternary`` ({-1, 0, 1}·scale) or
            ``binary`` ({-1, 1}·scale).
        bits: bits per element of the codes (ternary is stored in 2 bits, reported as 1.58).
        symmetric: symmetric grid with zero exactly representable (int only; fp, ternary and binary are symmetric).
        granularity: ``tensor``, ``channel`` (one scale per output row), ``group`` (``group_size`` consecutive
            input columns of a row share a scale) or ``token`` (activations: one scale per row, at run time).
        group_size: columns per group when ``granularity == "group"``.
        fp_format: one of ``FP_LAYOUTS`` when ``kind == "fp"``.
        scale_method: how ternary/binary scales are computed (``absmean``, ``absmedian``; ``tbt`` for ternary).
        dynamic: activations only — compute the scale from each input at run time instead of calibrating it.
    """

    kind: Kind = "int"
    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = None
    fp_format: str | None = None
    scale_method: str | None = None
    dynamic: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise `RecipeError` naming the first problem with this spec."""
        if self.kind not in KINDS:
            raise RecipeError(
                f"unknown format kind '{self.kind}'{suggest(str(self.kind), KINDS)}; use one of {', '.join(KINDS)}"
            )
        if self.granularity not in GRANULARITIES:
            raise RecipeError(
                f"unknown granularity '{self.granularity}'"
                f"{suggest(str(self.granularity), GRANULARITIES)}; use one of "
                f"{', '.join(GRANULARITIES)}"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise RecipeError(f"bits must be an integer, got {self.bits!r}")
        if self.kind == "int" and not 2 <= self.bits <= 8:
            raise RecipeError(
                f"bits={self.bits} is out of range for integer formats: use 2 to 8 "
                "(or kind 'ternary' / 'binary' below 2 bits)"
            )
        if self.kind == "fp":
            if self.fp_format not in FP_LAYOUTS:
                raise RecipeError(
                    f"fp format '{self.fp_format}' is unknown"
                    f"{suggest(str(self.fp_format), list(FP_LAYOUTS))}; use one of "
                    f"{', '.join(FP_LAYOUTS)}"
                )
            e, m = FP_LAYOUTS[self.fp_format]
            if self.bits != 1 + e + m:
                raise RecipeError(f"fp format {self.fp_format} has {1 + e + m} bits, not bits={self.bits}")
        if self.kind == "ternary":
            if self.bits != 2:
                raise RecipeError(f"ternary codes are stored in 2 bits, not bits={self.bits}")
            if self.scale_method not in (None, *TERNARY_SCALES):
                raise RecipeError(
                    f"ternary scale_method '{self.scale_method}' is unknown"
                    f"{suggest(str(self.scale_method), TERNARY_SCALES)}; use one of "
                    f"{', '.join(TERNARY_SCALES)}"
                )
        if self.kind == "binary":
            if self.bits != 1:
                raise RecipeError(f"binary codes take 1 bit, not bits={self.bits}")
            if self.scale_method not in (None, *BINARY_SCALES):
                raise RecipeError(
                    f"binary scale_method '{self.scale_method}' is unknown"
                    f"{suggest(str(self.scale_method), BINARY_SCALES)}; use one of "
                    f"{', '.join(BINARY_SCALES)}"
                )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 2:
                raise RecipeError(f"granularity 'group' needs group_size >= 2, got {self.group_size!r}")
        elif self.group_size is not None:
            raise RecipeError(f"group_size={self.group_size} is only valid with granularity 'group'")
        if self.dynamic and self.granularity not in ("token", "tensor"):
            raise RecipeError("dynamic activation quantization uses granularity 'token' or 'tensor'")

    # ------------------------------------------------------------------ derived facts
    @property
    def effective_code_bits(self) -> float:
        """Information bits per element: 1.58 (log2 3) for ternary, else ``bits``."""
        return 1.58 if self.kind == "ternary" else float(self.bits)

    @property
    def has_zero_point(self) -> bool:
        """True when a zero point is stored beside each scale (asymmetric integers)."""
        return self.kind == "int" and not self.symmetric

    def label(self) -> str:
        """Short human label, e.g. ``int4 asym g128``, ``fp8 e4m3``, ``ternary absmean``."""
        if self.kind == "int":
            base = f"int{self.bits} {'sym' if self.symmetric else 'asym'}"
        elif self.kind == "fp":
            base = f"fp{self.bits} {self.fp_format}"
        else:
            base = f"{self.kind} {self.scale_method or 'absmean'}"
        gran = {"tensor": "per-tensor", "channel": "per-channel", "token": "per-token", "group": f"g{self.group_size}"}[
            self.granularity
        ]
        return f"{base} {gran}" + (" dynamic" if self.dynamic else "")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict with only the fields that differ from the defaults of this kind (stable for YAML)."""
        return {k: v for k, v in asdict(self).items() if v is not None and not (k == "dynamic" and not v)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "format") -> QuantSpec:
        """Build a spec from a dict, rejecting unknown keys with a suggestion."""
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping of format fields, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        for key in data:
            if key not in names:
                raise RecipeError(
                    f"{where}: unknown key '{key}'{suggest(str(key), names)}; valid keys: {', '.join(names)}"
                )
        data = dict(data)
        kind = data.get("kind", "int")
        # Sensible per-kind defaults so that `{kind: ternary}` is a complete spec.
        if kind == "ternary":
            data.setdefault("bits", 2)
            data.setdefault("scale_method", "absmean")
            data.setdefault("granularity", "tensor")
        elif kind == "binary":
            data.setdefault("bits", 1)
            data.setdefault("scale_method", "absmean")
        elif kind == "fp":
            fmt = data.get("fp_format")
            if fmt in FP_LAYOUTS:
                e, m = FP_LAYOUTS[fmt]
                data.setdefault("bits", 1 + e + m)
        return cls(**data)
