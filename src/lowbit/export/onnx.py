"""Export a lowbit-compressed model to ONNX that runs in ONNX Runtime, keeping the quantized weights quantized.

The float parts of the model are traced with ``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``);
every quantized layer is traced as a single placeholder node and then rewritten with the ``onnx`` helper API:

* int8 per-channel / per-tensor weights (any int with a per-channel or per-tensor scale, codes kept in an int8 /
  uint8 container) → ``DequantizeLinear`` (per-axis scale, integer zero point) feeding ``MatMul`` / ``Conv``;
* 2-, 4- and 8-bit group weights of Linear layers, and 2/4-bit per-channel, ternary and binary weights →
  ``com.microsoft::MatMulNBits`` (``accuracy_level`` chooses fp32 compute (0) or int8 accumulation (4));
* every other format (int3, fp8, fp4, Conv weights below 8 bits in groups, ...) → the dequantized fp32 weight as
  a plain initializer, with a warning naming the layers.

Activations are reproduced op by op: input scale / shift vectors as ``Mul`` / ``Sub``; dynamic integer
activations (per token or per tensor, symmetric or asymmetric) with ``ReduceMax``/``Div``/``Round``/``Clip``, which
is lowbit's arithmetic exactly (ONNX Runtime's ``DynamicQuantizeLinear`` is per-tensor asymmetric uint8, so it is
not used); static 8-bit activations as a ``QuantizeLinear``/``DequantizeLinear`` pair; binary activations as
``Where(x >= 0, a, -a)`` with ``a`` the per-token mean |x|; ternary ones with ``Round``/``Clip``. Low-bit float
activations (fp8 per token) and absmedian ternary activations are refused with a `ModelError` naming the layer.

Example:
    >>> import tempfile, torch
    >>> import onnxruntime as ort
    >>> from torch import nn
    >>> import lowbit
    >>> m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8)).eval()
    >>> q = lowbit.compress(m, "w4g128", progress=False)
    >>> x = torch.randn(3, 64)
    >>> out = tempfile.mkdtemp() + "/model.onnx"
    >>> report = export_onnx(q, x, out)
    >>> report.paths()
    {'0': 'QDQ int8', '2': 'MatMulNBits bits=4', '4': 'QDQ int8'}
    >>> so = ort.SessionOptions()  # ORT fuses int8 DQ→MatMul into MatMulNBits; keep it at fp32 accuracy
    >>> so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    >>> sess = ort.InferenceSession(out, so, providers=["CPUExecutionProvider"])
    >>> y = sess.run(None, {"input": x.numpy()})[0]
    >>> bool(abs(y - q(x).detach().numpy()).max() < 1e-5)
    True
"""

from __future__ import annotations

import copy
import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.batches import Batch
from lowbit.errors import ModelError
from lowbit.formats.scales import MIN_SCALE
from lowbit.formats.spec import QuantSpec
from lowbit.nn.qat import QATLayer
from lowbit.nn.qlayers import QuantConv2d, QuantLayer
from lowbit.report.atomic import atomic_write_bytes

_DOMAIN = "lowbit_export"  # placeholder nodes, all rewritten before saving
NBITS_SUPPORTED = (2, 4, 8)  # what onnxruntime's CPU MatMulNBits kernel runs (1.32)


@dataclass
class LayerExport:
    """How one quantized layer was written: ``weights`` path (``QDQ int8``, ``MatMulNBits bits=4``,
    ``fp32 (dequantized)``, ``fp32``) and ``activations`` path (``float``, ``int8 token (Round/Clip)``, ...)."""

    name: str
    type: str
    weight_format: str
    weights: str
    activations: str


@dataclass
class ExportReport:
    """Result of `export_onnx`: the file, its size, the opset and each quantized layer's mapping."""

    path: Path
    bytes: int
    opset: int
    layers: list[LayerExport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def paths(self) -> dict[str, str]:
        """``{layer name: weights path}``."""
        return {entry.name: entry.weights for entry in self.layers}


def export_onnx(
    model: nn.Module, example: Batch, path: str | Path, *, opset: int = 21, accuracy_level: int = 0
) -> ExportReport:
    """Write ``model`` (a lowbit-compressed or packed model) to ``path`` as ONNX, atomically.

    ``example`` is one input batch (a tensor, or a dict of tensors passed as keyword arguments); its first
    dimension (and, for dict inputs, its second: the sequence) is exported as dynamic. ``accuracy_level`` is
    MatMulNBits' compute mode: 0 (fp32, matches lowbit to float rounding) or 4 (int8 accumulation, faster).
    """
    try:
        import onnx
    except ImportError:
        raise ModelError("ONNX export needs the onnx package: pip install 'lowbit[onnx]'") from None
    if not 17 <= opset <= 21:
        raise ModelError(f"ONNX opset {opset} is not supported: use 17 to 21")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ModelError(f"accuracy_level must be 0 to 4 (MatMulNBits), got {accuracy_level}")
    model = copy.deepcopy(model).eval().cpu()
    layers: list[tuple[str, QuantLayer]] = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLayer):
            _check_layer(name, mod)
            layers.append((name, mod))
            _set_submodule(model, name, _Placeholder(mod, len(layers) - 1))
        elif isinstance(mod, QATLayer):
            raise ModelError(
                f"layer '{name}' ({type(mod).__name__}) cannot be exported to ONNX: only QuantLinear / QuantConv2d "
                "(and their packed forms) are; finish QAT with lowbit.compress so layers become QuantLinear"
            )
    keys = list(example) if isinstance(example, dict) else ["input"]
    tensors = [example[k] for k in keys] if isinstance(example, dict) else [example]
    wrapper = _Positional(model, keys if isinstance(example, dict) else None)
    with torch.no_grad():
        out = wrapper(*tensors)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    out_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    axes: dict[str, dict[int, str]] = {}
    for k, t in zip(keys, tensors, strict=True):
        axes[k] = {0: "batch", **({1: "sequence"} if isinstance(example, dict) and t.dim() >= 2 else {})}
    axes.update({o: {0: "batch"} for o in out_names})
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and custom-domain chatter
        torch.onnx.export(
            wrapper, tuple(tensors), buf, dynamo=False, opset_version=min(opset, 20), input_names=keys,
            output_names=out_names, dynamic_axes=axes, do_constant_folding=True,
        )  # fmt: skip
    proto = onnx.load_from_string(buf.getvalue())
    report = ExportReport(Path(path), 0, opset)
    _rewrite(proto, layers, opset, accuracy_level, report)
    fallback = [e.name for e in report.layers if e.weights.startswith("fp32 (")]
    if fallback:
        msg = f"{len(fallback)} layer(s) exported with dequantized fp32 weights (no ONNX kernel): {', '.join(fallback)}"
        report.warnings.append(msg)
        warnings.warn(msg, stacklevel=2)
    data = proto.SerializeToString()
    if len(data) >= 2**31:
        raise ModelError("the exported model exceeds ONNX's 2 GB protobuf limit (external data is not supported)")
    target = Path(path)
    atomic_write_bytes(target, data)  # temp file beside the target + os.replace: whole or not at all
    report.bytes = target.stat().st_size
    return report


# ---------------------------------------------------------------------------------------------- tracing
class _Positional(nn.Module):
    """Calls ``model(**dict(zip(keys, args)))`` (or ``model(*args)``) so the exporter sees positional inputs."""

    def __init__(self, model: nn.Module, keys: list[str] | None) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(**dict(zip(self.keys, args, strict=True))) if self.keys else self.model(*args)


class _Placeholder(nn.Module):
    """Runs the quantized layer eagerly but traces as one ``lowbit_export::QuantLayer`` node."""

    def __init__(self, layer: QuantLayer, index: int) -> None:
        super().__init__()
        self.layer = layer

        class Mark(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
                state = torch._C._get_tracing_state()  # run the layer eagerly, untraced: only Mark is recorded
                torch._C._set_tracing_state(None)
                try:
                    return layer(x)
                finally:
                    torch._C._set_tracing_state(state)

            @staticmethod
            def symbolic(g: Any, x: Any) -> Any:
                y = g.op(f"{_DOMAIN}::QuantLayer", x, index_i=index)
                rank = x.type().dim()
                if rank is not None:  # rank and dtype known, sizes left symbolic (batch / sequence stay dynamic)
                    y.setType(x.type().with_sizes([None] * rank))
                return y

        self.mark = Mark

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mark.apply(x)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _check_layer(name: str, layer: QuantLayer) -> None:
    """Refuse activation formats the export cannot reproduce, naming the layer."""
    spec = layer.act_spec
    if layer.act is None or spec is None:
        return
    if spec.kind == "fp":
        raise ModelError(
            f"layer '{name}': {spec.label()} activations cannot be exported to ONNX (ONNX Runtime has no per-token "
            "low-bit float quantizer); use int8_token activations or none"
        )
    if spec.kind == "ternary" and spec.scale_method == "absmedian":
        raise ModelError(f"layer '{name}': ternary absmedian activations cannot be exported (ONNX has no median)")
    if not spec.dynamic and not layer.act.calibrated:
        raise ModelError(f"layer '{name}': static activation quantizer is not calibrated; compress it with data=")


# ---------------------------------------------------------------------------------------------- graph rewrite
class _Builder:
    """Collects nodes and initializers for one layer, with names unique to the layer."""

    def __init__(self, prefix: str, opset: int) -> None:
        self.prefix, self.opset, self.nodes, self.inits, self._n = prefix, opset, [], [], 0

    def const(self, value: np.ndarray | float, name: str = "c") -> str:
        from onnx import numpy_helper

        arr = np.asarray(value, dtype=np.float32) if isinstance(value, float) else np.ascontiguousarray(value)
        self._n += 1
        full = f"{self.prefix}.{name}_{self._n}"
        self.inits.append(numpy_helper.from_array(arr, full))
        return full

    def op(self, op_type: str, *inputs: str, out: str | None = None, domain: str = "", **attrs: Any) -> str:
        from onnx import helper

        self._n += 1
        out = out or f"{self.prefix}/{op_type}_{self._n}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], f"{self.prefix}/{op_type}_{self._n}",
                                           domain=domain, **attrs))  # fmt: skip
        return out

    def reduce(self, op_type: str, x: str, last_axis: bool) -> str:
        """``op_type`` over the last axis (per token) or over all axes (per tensor), dims kept."""
        if not last_axis:
            return self.op(op_type, x, keepdims=1)
        if self.opset >= 18:
            return self.op(op_type, x, self.const(np.array([-1], np.int64), "axes"), keepdims=1)
        return self.op(op_type, x, axes=[-1], keepdims=1)


def _rewrite(proto: Any, layers: list[tuple[str, QuantLayer]], opset: int, level: int, report: ExportReport) -> None:
    from onnx import helper

    graph = proto.graph
    new_nodes, uses_ms = [], False
    for node in graph.node:
        if node.domain != _DOMAIN:
            new_nodes.append(node)
            continue
        index = next(a.i for a in node.attribute if a.name == "index")
        name, layer = layers[index]
        b = _Builder(name or "layer", opset)
        x = _emit_input(b, layer, node.input[0])
        if isinstance(layer, QuantConv2d) and layer.patch_tokens:  # per-token = per patch: a matmul over patches
            act = _emit_act(b, layer, _emit_patches(b, layer, x))
            y = f"{b.prefix}/patch_matmul"
            entry = _emit_weights(b, layer, act, y, level, matrix=True)
            b.op("Transpose", y, out=node.output[0], perm=[0, 3, 1, 2])
        else:
            act = _emit_act(b, layer, x)
            entry = _emit_weights(b, layer, act, node.output[0], level)
        report.layers.append(LayerExport(name, "Conv2d" if isinstance(layer, QuantConv2d) else "Linear",
                                         layer.weight_spec.label() if layer.weight_spec else "fp32",
                                         entry, _act_label(layer)))  # fmt: skip
        uses_ms |= entry.startswith("MatMulNBits")
        new_nodes.extend(b.nodes)
        graph.initializer.extend(b.inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    imports = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx", _DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend([helper.make_opsetid("", opset), *imports])
    if uses_ms:
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    if len(layers) != len(report.layers):
        raise ModelError("some quantized layers were not traced (are they called outside forward?)")


def _act_label(layer: QuantLayer) -> str:
    vectors = (("input_scale Mul", layer.input_scale), ("input_shift Sub", layer.input_shift))
    parts = [p for p, v in vectors if v is not None]
    if layer.act is not None:
        s = layer.act.spec
        qdq = not s.dynamic and s.kind == "int" and s.bits == 8
        how = "QDQ" if qdq else "Where" if s.kind == "binary" else "Round/Clip"
        parts.append(f"{s.label()} ({how})")
    return ", ".join(parts) or "float"


def _emit_input(b: _Builder, layer: QuantLayer, x: str) -> str:
    conv = isinstance(layer, QuantConv2d)
    for vec, op in ((layer.input_scale, "Mul"), (layer.input_shift, "Sub")):
        if vec is not None:
            v = vec.detach().float().numpy()
            x = b.op(op, x, b.const(v.reshape(1, -1, 1, 1) if conv else v, "in"))
    return x


def _emit_patches(b: _Builder, layer: QuantConv2d, x: str) -> str:
    """The input's patches ``(N, OH, OW, C·kh·kw)`` in `lowbit.nn.patches` order: a depthwise ``Conv`` whose
    kh·kw filters per channel are one-hot (exact: each output is one input value or padding zero), then a
    ``Transpose``."""
    kh, kw = layer.kernel_size
    c = layer.in_channels
    eye = np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw)
    attrs = {**_conv_attrs(layer), "group": c}
    p = b.op("Conv", x, b.const(np.tile(eye, (c, 1, 1, 1)), "patch_taps"), **attrs)
    return b.op("Transpose", p, perm=[0, 2, 3, 1])


def _emit_act(b: _Builder, layer: QuantLayer, x: str) -> str:
    """Activation fake-quantization with lowbit's exact arithmetic (see `lowbit.formats.qtensor.fake_quantize`)."""
    if layer.act is None:
        return x
    s: QuantSpec = layer.act.spec
    per_token = s.granularity == "token"
    if not s.dynamic:  # static per-tensor integers: calibrated scale (fp16-representable) and integer zero
        scale = np.float32(layer.act.scale.item())
        zero = None if layer.act.zero is None else float(layer.act.zero.item())
        if s.bits == 8:
            zp = np.array(0, np.int8) if zero is None else np.array(round(zero), np.uint8)
            sc, z = b.const(np.array(scale, np.float32), "act_scale"), b.const(zp, "act_zero")
            return b.op("DequantizeLinear", b.op("QuantizeLinear", x, sc, z), sc, z)
        qmin, qmax = (-(2 ** (s.bits - 1)), 2 ** (s.bits - 1) - 1) if s.symmetric else (0, 2**s.bits - 1)
        return _int_qdq(b, x, b.const(np.array(scale, np.float32)), None if zero is None else b.const(zero), qmin, qmax)
    absx = b.op("Abs", x)
    floor = b.const(MIN_SCALE, "min_scale")
    if s.kind == "binary":
        a = b.const(1.0) if s.scale_method == "none" else b.op("Max", b.reduce("ReduceMean", absx, per_token), floor)
        return b.op("Where", b.op("GreaterOrEqual", x, b.const(0.0)), a, b.op("Neg", a))
    if s.kind == "ternary":
        a = b.op("Max", b.reduce("ReduceMean", absx, per_token), floor)
        if s.scale_method == "tbt":
            a = b.op("Max", b.op("Mul", b.reduce("ReduceMean", absx, per_token), b.const(4.0 / 3.0)), floor)
        q = b.op("Clip", b.op("Round", b.op("Div", x, a)), b.const(-1.0), b.const(1.0))
        return b.op("Mul", q, a)
    if s.symmetric:
        qmax = 2 ** (s.bits - 1) - 1
        scale = b.op("Max", b.op("Div", b.reduce("ReduceMax", absx, per_token), b.const(float(qmax))), floor)
        return _int_qdq(b, x, scale, None, -qmax - 1, qmax)
    qmax = 2**s.bits - 1
    lo = b.op("Min", b.reduce("ReduceMin", x, per_token), b.const(0.0))
    hi = b.op("Max", b.reduce("ReduceMax", x, per_token), b.const(0.0))
    scale = b.op("Max", b.op("Div", b.op("Sub", hi, lo), b.const(float(qmax))), floor)
    zero = b.op("Clip", b.op("Round", b.op("Div", b.op("Neg", lo), scale)), b.const(0.0), b.const(float(qmax)))
    return _int_qdq(b, x, scale, zero, 0, qmax)


def _int_qdq(b: _Builder, x: str, scale: str, zero: str | None, qmin: int, qmax: int) -> str:
    v = b.op("Div", x, scale)
    if zero is not None:
        v = b.op("Add", v, zero)
    q = b.op("Clip", b.op("Round", v), b.const(float(qmin)), b.const(float(qmax)))
    return b.op("Mul", q if zero is None else b.op("Sub", q, zero), scale)


def _emit_weights(b: _Builder, layer: QuantLayer, x: str, out: str, level: int, matrix: bool = False) -> str:
    """Weight storage + the matmul / conv; returns the path label. ``matrix``: a convolution as the matmul of its
    patches (``x``: ``(N, OH, OW, C·kh·kw)``) with its flattened weight."""
    spec, conv = layer.weight_spec, isinstance(layer, QuantConv2d) and not matrix
    rows, cols = layer._matrix_shape
    if matrix and getattr(layer, "groups", 1) > 1:  # grouped: one block-diagonal matrix over the whole patch
        return _emit_block_diagonal(b, layer, x, out)
    bias = None if layer.bias is None else b.const(layer.bias.detach().float().numpy(), "bias")
    zero = None if getattr(layer, "zero", None) is None else layer.zero.detach().float()
    integral = zero is None or bool(torch.equal(zero, zero.round()))
    per_row = spec is not None and (spec.granularity in ("channel", "tensor") or (spec.group_size or 0) >= cols)
    label = "fp32" if spec is None else "fp32 (dequantized)"
    nbits = not conv and spec is not None and _nbits_ok(spec, cols) and integral
    if spec is not None and spec.kind == "int" and per_row and integral and (spec.bits == 8 or conv or not nbits):
        codes = layer.codes.detach().numpy()
        scale = layer.scale.detach().float().numpy().reshape(-1)
        zp = np.zeros_like(scale, np.int8) if zero is None else zero.numpy().reshape(-1).astype(np.uint8)
        if zero is None and layer.act is not None and not layer.act.spec.dynamic:
            # static uint8 activations: ORT fuses Q/DQ into QGemm/QLinearConv, whose u8×s8 AVX2 kernel saturates
            # int16 pair sums; u8×u8 does not, so store symmetric codes as uint8 with zero point 128 (exact)
            codes, zp = (codes.astype(np.int16) + 128).astype(np.uint8), np.full_like(scale, 128, np.uint8)
        if scale.size == 1:  # per-tensor: scalar scale and zero point
            scale, zp = scale.reshape(()), zp.reshape(())
        if conv:
            w_q = codes.reshape(tuple(layer.weight.shape))
            weight = b.op("DequantizeLinear", b.const(w_q, "w_q"), b.const(scale, "w_scale"), b.const(zp, "w_zero"),
                          **({"axis": 0} if scale.size > 1 else {}))  # fmt: skip
        else:
            weight = b.op("DequantizeLinear", b.const(np.ascontiguousarray(codes.T), "w_q"), b.const(scale, "w_scale"),
                          b.const(zp, "w_zero"), **({"axis": 1} if scale.size > 1 else {}))  # fmt: skip
        label = f"QDQ int{spec.bits}" if spec.bits == 8 else f"QDQ int{spec.bits} (int8 container)"
    elif nbits:
        return _emit_nbits(b, layer, x, out, bias, level)
    else:
        w = (layer.weight if conv else layer.weight_matrix()).detach().float().numpy()
        weight = b.const(w if conv else np.ascontiguousarray(w.T), "weight")
    if conv:
        args = [x, weight] + ([bias] if bias else [])
        b.op("Conv", *args, out=out, **_conv_attrs(layer))
    else:
        y = b.op("MatMul", x, weight, out=None if bias else out)
        if bias:
            b.op("Add", y, bias, out=out)
    return label


def _emit_block_diagonal(b: _Builder, layer: QuantLayer, x: str, out: str) -> str:
    """A grouped convolution's patches times its dequantized weight laid out block-diagonally (zeros between the
    groups, so each group's slice of a patch meets only its own output channels)."""
    w = layer.weight_matrix().detach().float()
    g = layer.groups
    o, kg = w.shape
    full = torch.zeros(o, kg * g)
    for i in range(g):
        rows = slice(i * o // g, (i + 1) * o // g)
        full[rows, i * kg : (i + 1) * kg] = w[rows]
    weight = b.const(np.ascontiguousarray(full.numpy().T), "weight")
    y = b.op("MatMul", x, weight, out=None if layer.bias is not None else out)
    if layer.bias is not None:
        b.op("Add", y, b.const(layer.bias.detach().float().numpy(), "bias"), out=out)
    return "fp32 (dequantized)"


def _nbits_bits(spec: QuantSpec) -> int:
    return 2 if spec.kind in ("ternary", "binary") else spec.bits


def _nbits_block(spec: QuantSpec, cols: int) -> int | None:
    """MatMulNBits block size for a layer: the group size (or a power of two in 16..256 dividing it), or 128
    (capped by K) when one scale covers a whole row; None when no block fits."""
    g = spec.group_size if spec.granularity == "group" else None
    if g is None or g >= cols:
        return min(128, max(16, 1 << (cols - 1).bit_length()))
    for blk in (256, 128, 64, 32, 16):
        if g % blk == 0:
            return blk
    return None


def _nbits_ok(spec: QuantSpec, cols: int) -> bool:
    if spec.kind in ("ternary", "binary"):
        return 2 in NBITS_SUPPORTED and _nbits_block(spec, cols) is not None
    return spec.kind == "int" and spec.bits in NBITS_SUPPORTED and _nbits_block(spec, cols) is not None


def _pack_lsb(u: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, LSB first (MatMulNBits' layout), padding each row to a byte."""
    planes = ((u[..., None].astype(np.uint16) >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(*u.shape[:-1], -1), axis=-1, bitorder="little")


def _emit_nbits(b: _Builder, layer: QuantLayer, x: str, out: str, bias: str | None, level: int) -> str:
    spec = layer.weight_spec
    assert spec is not None
    bits, (rows, cols) = _nbits_bits(spec), layer._matrix_shape
    blk = _nbits_block(spec, cols)
    assert blk is not None
    n_blocks = -(-cols // blk)
    codes = layer.codes.detach().to(torch.int64).numpy()
    scale = layer.scale.detach().float().numpy()
    # unit of each block: group index (group g is a multiple of blk) or the single per-row / per-tensor unit
    unit_cols = spec.group_size if spec.granularity == "group" and spec.group_size < cols else cols
    unit = np.minimum(np.arange(n_blocks) * blk // unit_cols, scale.shape[1] - 1)
    scale_b = np.broadcast_to(scale[:, unit], (rows, n_blocks)).astype(np.float32)
    offset = 0 if (spec.kind == "int" and not spec.symmetric) else 2 ** (bits - 1)
    u = codes + offset  # symmetric / ternary / binary codes sit around the default zero point 2^(bits-1)
    inputs = [x]
    if getattr(layer, "zero", None) is not None:
        z = np.broadcast_to(layer.zero.detach().numpy().round().astype(np.int64)[:, unit], (rows, n_blocks))
        pad_val = z[:, -1:]
    else:
        z, pad_val = None, np.full((rows, 1), offset)
    u = np.concatenate([u, np.broadcast_to(pad_val, (rows, n_blocks * blk - cols))], axis=1)
    packed = _pack_lsb(u.reshape(rows, n_blocks, blk), bits)
    inputs += [b.const(packed, "B"), b.const(np.ascontiguousarray(scale_b), "scales")]
    if z is not None:
        inputs.append(b.const(_pack_lsb(np.ascontiguousarray(z), bits), "zero_points"))
    y = b.op("MatMulNBits", *inputs, out=None if bias else out, domain="com.microsoft", K=cols, N=rows, bits=bits,
             block_size=blk, accuracy_level=level)  # fmt: skip
    if bias:
        b.op("Add", y, bias, out=out)
    return f"MatMulNBits bits={bits}"


def _conv_attrs(layer: QuantConv2d) -> dict[str, Any]:
    kh, kw = layer.kernel_size
    dh, dw = layer.dilation
    if isinstance(layer.padding, str):
        if layer.padding == "valid":
            pads = [0, 0, 0, 0]
        else:  # "same" (stride 1): torch puts the odd element at the end
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
    else:
        ph, pw = layer.padding
        pads = [ph, pw, ph, pw]
    return {"kernel_shape": [kh, kw], "strides": list(layer.stride), "pads": pads, "dilations": [dh, dw],
            "group": layer.groups}  # fmt: skip


__all__ = ["ExportReport", "LayerExport", "export_onnx"]
