"""QAT as a registered method: swap layers for QAT layers, distil from the original model, export the result.

The stage's ``weights`` / ``activations`` formats pick default quantizers (LSQ for integers, BitNet absmean for
ternary, XNOR-scaled sign for binary, per-token int8 / LSQ / sign for activations); ``options`` choose others and
the training settings:

- ``freeze_unquantized``: train only the QAT layers (embeddings and norms stay as they are)
- ``weight_quantizer`` / ``act_quantizer``: a name from ``lowbit.quantizers.registry`` (``bnn``, ``xnor``,
  ``bireal``, ``reste``, ``biper``, ``react``, ``lsq``, ``pact``, ``ternary_absmedian``, ``two_plane``, ...)
- ``epochs``, ``batch_size``, ``lr``, ``weight_decay``, ``optimizer``, ``schedule``, ``loss`` (kd / ce / cosine /
  mse), ``temperature``, ``alpha``, ``seed``, ``checkpoint_dir`` (resumable), ``warmup_steps``, ``grad_clip``

Training data: ``data`` is a dict ``{"inputs": Tensor | dict, "labels": Tensor | None}`` (or a list of batches,
which are concatenated). Layers whose trained forward a stored format reproduces become `QuantLinear` /
`QuantConv2d`; the others stay QAT layers (saved with their latent weights).

Example:
    >>> import lowbit
    >>> r = lowbit.Recipe.from_dict({"stages": [{"method": "qat", "weights": "ternary_absmean",
    ...     "options": {"epochs": 1, "weight_quantizer": "ternary"}}]})
    >>> r.stages[0].options["epochs"]
    1
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

import torch
from torch import nn

from lowbit.errors import DataError
from lowbit.formats.qtensor import QTensor
from lowbit.formats.spec import QuantSpec
from lowbit.methods.registry import LayerPlan, Method, MethodContext, register_method
from lowbit.nn.qat import QATLayer, to_qat
from lowbit.qat.trainer import TrainConfig, train

TRAIN_OPTIONS = tuple(f.name for f in fields(TrainConfig))


def default_weight_quantizer(spec: QuantSpec | None) -> tuple[str | None, int]:
    """QAT quantizer name and bits matching a weight format."""
    if spec is None:
        return None, 32
    if spec.kind == "ternary":
        return {"absmedian": "ternary_absmedian", "tbt": "ternary_tbt"}.get(spec.scale_method or "", "ternary"), 2
    if spec.kind == "binary":
        return "xnor", 1
    return "lsq", spec.bits


def default_act_quantizer(spec: QuantSpec | None) -> tuple[str | None, int]:
    """QAT quantizer name and bits matching an activation format."""
    if spec is None:
        return None, 32
    if spec.kind == "binary":
        return ("xnor" if spec.scale_method == "absmean" else "bnn"), 1
    if spec.kind == "int" and spec.bits == 8 and spec.dynamic:
        return "int8_token", 8
    return "lsq", spec.bits


def training_tensors(data: Any) -> tuple[Any, torch.Tensor | None]:
    """``(inputs, labels)`` from a dict ``{"inputs", "labels"}`` or a list of input batches."""
    if isinstance(data, dict) and "inputs" in data:
        return data["inputs"], data.get("labels")
    if isinstance(data, (list, tuple)) and data:
        first = data[0]
        if isinstance(first, dict):
            return {k: torch.cat([b[k] for b in data]) for k in first}, None
        if isinstance(first, (list, tuple)):
            return torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
        return torch.cat(list(data)), None
    raise DataError("QAT needs training data: pass data={'inputs': X, 'labels': y} or a list of batches")


@register_method("qat")
class QAT(Method):
    """Quantization-aware training with distillation from the original (float) model."""

    needs_data = True
    option_names = ("weight_quantizer", "act_quantizer", "freeze_unquantized", *TRAIN_OPTIONS)

    def quantize_layers(self, model: nn.Module, plan: list[LayerPlan], ctx: MethodContext) -> dict[str, QTensor]:
        from lowbit.compress import set_submodule

        opts = dict(ctx.options)
        wq_opt, aq_opt = opts.pop("weight_quantizer", None), opts.pop("act_quantizer", None)
        freeze = bool(opts.pop("freeze_unquantized", False))
        cfg = TrainConfig(**opts)
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        qat_layers: dict[str, QATLayer] = {}
        for p in plan:
            wname, wbits = default_weight_quantizer(p.weights)
            aname, abits = default_act_quantizer(p.activations)
            edge = p.weights is not None and p.weights.kind == "int" and p.weights.bits == 8
            layer = to_qat(
                p.module,
                weight=(wq_opt if (wq_opt and not edge) else wname),
                act=(aq_opt if (aq_opt and p.activations is not None) else aname),
                weight_bits=wbits,
                act_bits=abits,
            )
            set_submodule(model, p.name, layer)
            qat_layers[p.name] = layer
        if freeze:  # train only the quantized layers (much cheaper on models dominated by embeddings)
            keep = {id(p) for layer in qat_layers.values() for p in layer.parameters()}
            for p in model.parameters():
                p.requires_grad_(id(p) in keep)
        inputs, labels = training_tensors(ctx.data)
        train(model, teacher, inputs, labels, cfg, progress=ctx.progress)
        out: dict[str, QTensor] = {}
        for name, layer in qat_layers.items():
            q = layer.to_quant_layer()
            set_submodule(model, name, q if q is not None else layer)
        return out
