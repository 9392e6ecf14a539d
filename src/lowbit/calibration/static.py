"""Calibrate static activation quantizers with eager forward pre-hooks (no graph tracing).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lowbit.formats import ACT_FORMATS, FORMATS
    >>> from lowbit.methods.rtn import rtn_quantize
    >>> from lowbit.nn import QuantLinear
    >>> from lowbit.calibration.static import calibrate_activations
    >>> lin = nn.Linear(8, 4)
    >>> qt = rtn_quantize(lin.weight, FORMATS["int8"])
    >>> q = nn.Sequential(QuantLinear.from_float(lin, qt, ACT_FORMATS["int8_static"]))
    >>> calibrate_activations(q, [torch.randn(16, 8)], progress=False)
    1
    >>> bool(q[0].act.calibrated)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.batches import run_model
from lowbit.calibration.observers import Observer, make_observer, range_to_params
from lowbit.errors import DataError
from lowbit.nn.act import ActQuantizer


def calibrate_activations(model: nn.Module, batches: Sequence[Any] | None, *, progress: bool = True) -> int:
    """Observe every uncalibrated static `ActQuantizer`'s input over ``batches``; returns how many were calibrated."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, ActQuantizer) and not m.calibrated]
    if not targets:
        return 0
    if not batches:
        raise DataError(
            f"{len(targets)} layers use static activation quantization, which needs calibration data: "
            "pass data= to lowbit.compress, or use a dynamic activation format"
        )
    observers: dict[str, Observer] = {}
    handles = []
    for name, mod in targets:
        obs = observers[name] = make_observer(mod.calibrator, mod.spec, mod.percentile)
        handles.append(mod.register_forward_pre_hook(lambda _m, args, obs=obs: obs.update(args[0])))
        mod.observing = True  # float pass-through while observing (the usual PTQ practice)
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating activations", disable=None if progress else True, leave=False):
                run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
        for _name, mod in targets:
            mod.observing = False
    for name, mod in targets:
        lo, hi = observers[name].range()
        mod.set_range(*range_to_params(lo, hi, mod.spec))
    return len(targets)
