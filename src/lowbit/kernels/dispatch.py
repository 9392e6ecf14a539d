"""Shape-aware dispatch: per packed layer and batch size, run the native kernel or the dense reference path,
whichever measured faster on this machine.

The first call of a layer at a new batch-size bucket (1, 2, 4, …, 4096 rows) times both paths on that very
input (in alternation after a warm-up, the best of 3–30 rounds: more for small layers, whose calls vary most)
and remembers the winner for the layer, so the cost is paid once per shape; `layer_report` returns what was
measured (``lowbit inspect --packed``). A decided call then runs only its chosen path (`LayerDispatch.hot`).
The mode comes from ``LOWBIT_KERNELS`` or `use_mode`: ``auto`` (measure, the default), ``native`` (always the
native kernel where one exists: parity tests), ``portable`` (like ``native``, with the library built without SIMD:
what a CPU without AVX2 gets), ``avx2`` (like ``auto``, with the library built without AVX-512: what a CPU without
AVX-512 VNNI gets) or ``reference`` (never: the plain PyTorch reference kernel).

Under ``torch.compile`` a packed linear layer becomes one opaque custom op, ``lowbit::packed_linear``, which runs
the same dispatch at run time: the compiled graph fuses everything around the layers (GELU, LayerNorm, residual
adds, attention) and still calls the native kernels, and ``fullgraph=True`` holds. The mode is read when the graph
is traced (``reference`` then traces the plain PyTorch path). ``torch.export`` and ``torch.jit.trace`` record the
reference path instead, so an exported program needs nothing from lowbit to run.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lowbit
    >>> from lowbit.kernels.dispatch import layer_report, use_mode
    >>> q = lowbit.pack(lowbit.compress(nn.Sequential(nn.Linear(512, 512)), "w1a1", progress=False))
    >>> with use_mode("native"):
    ...     _ = q(torch.randn(1, 512))
    >>> layer_report(q[0])[0]["path"] in ("w1a1", "reference")
    True
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.formats.registry import ACT_FORMATS
from lowbit.formats.spec import QuantSpec
from lowbit.kernels.dispatch_report import layer_report  # noqa: F401 (re-exported)
from lowbit.kernels.fakequant import fake_quantize_fast, has_fast_path
from lowbit.kernels.heap import release_free_heap
from lowbit.kernels.race import MAX_ROUNDS, RACE_BUDGET_S, REPEATS, race  # noqa: F401 (re-exported)
from lowbit.kernels.routes import Route, awaits_calibration, route_for

MODES = ("auto", "native", "reference", "portable")
#: A race whose fp32 weight and output together reach this many bytes returns the freed heap to the OS afterwards
#: (`kernels.heap`: a walk over the heap; smaller races leave little behind).
TRIM_BYTES = 4 << 20
_mode_override: list[str] = []
_env_mode: str | None = None  # LOWBIT_KERNELS, read once: an environment lookup costs microseconds per layer call
_warned: set[str] = set()


def mode() -> str:
    """The active dispatch mode (``use_mode`` beats ``LOWBIT_KERNELS``, read at first use; default ``auto``)."""
    global _env_mode
    if _mode_override:
        return _mode_override[-1]
    if _env_mode is None:
        value = os.environ.get("LOWBIT_KERNELS", "auto").strip().lower() or "auto"
        if value not in (*MODES, "avx2"):
            raise ValueError(f"LOWBIT_KERNELS={value!r} is not one of {', '.join(MODES)}, avx2")
        _env_mode = "auto" if value == "avx2" else value  # avx2 only chooses how the library is built
    return _env_mode


@contextlib.contextmanager
def use_mode(value: str) -> Iterator[None]:
    """Temporarily force a dispatch mode (``auto``, ``native`` or ``reference``)."""
    if value not in MODES:
        raise ValueError(f"kernel mode {value!r} is not one of {', '.join(MODES)}")
    _mode_override.append(value)
    try:
        yield
    finally:
        _mode_override.pop()


@contextlib.contextmanager
def environment_mode(value: str) -> Iterator[None]:
    """Run as if ``LOWBIT_KERNELS`` said ``value`` (a mode of `MODES`). Unlike `use_mode`, whose override turns off
    the decided calls' short paths (`LayerDispatch.hot`, `dense_hot`, the one-call conv), ``auto`` here runs a
    packed model exactly as the default does: for benchmarks and tests of that path under another setting."""
    global _env_mode
    if value not in MODES:
        raise ValueError(f"kernel mode {value!r} is not one of {', '.join(MODES)}")
    before = _env_mode  # (None: read from the environment again afterwards)
    _env_mode = value
    try:
        yield
    finally:
        _env_mode = before


def bucket(rows: int) -> int:
    """Batch-size bucket: the next power of two, capped at 4096."""
    return min(4096, 1 << max(0, rows - 1).bit_length())


def _native_ready() -> bool:
    from lowbit.kernels import native

    if native.available():
        isa = native.build_info()["isa"]
        if isa == "scalar" and "isa" not in _warned:
            _warned.add("isa")
            warnings.warn(
                f"lowbit: this CPU or compiler gives no AVX2 ({isa} build): native kernels run their portable "
                "path and dispatch keeps the reference kernel wherever that is faster",
                stacklevel=3,
            )
        return True
    reason = native.unavailable_reason()
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"lowbit: fast CPU kernels unavailable ({reason}); using the reference kernel", stacklevel=3)
    return False


def native_patches_ready() -> bool:
    """Whether a packed convolution may cut its input's patches in C (`kernels.im2col.Im2col`, the same values as the
    PyTorch path): not in ``reference`` mode, not while compiling or tracing (a graph cannot see a C call), and
    only with the native library loaded."""
    how = _mode_override[-1] if _mode_override else _env_mode or mode()
    if how == "reference" or torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return False
    from lowbit.kernels import native

    return native.available()


def c_ready_bias(bias: torch.Tensor | None, n: int) -> bool:
    """Whether the C entries can read ``bias`` as it is: None, or ``n`` contiguous fp32 values on the CPU (another
    dtype or device, a strided or a broadcast one takes the checked path, `layer.linear`, which converts it)."""
    return bias is None or (bias.dtype is torch.float32 and bias.is_cpu and bias.is_contiguous() and bias.numel() == n)


def layer_bias(layer: Any) -> torch.Tensor | None:
    """``layer.bias`` in fewer steps on the per-call path: the registered Parameter, else what a plain attribute holds
    (a tensor set later on a layer built without bias, or None)."""
    b = layer._parameters.get("bias")
    return b if b is not None else getattr(layer, "bias", None)


#: A convolution's whole calls for `LayerDispatch.decide`: (native, dense, an fp32 conv of its shape for the report).
WholeCalls = tuple[Callable[[], Any], Callable[[], Any], Callable[[], Any]]


class LayerDispatch:
    """Per-layer state: the route, its prepared weights (built once) and the decision per batch bucket."""

    def __init__(self, route: Route, layer: Any) -> None:
        self.route = route
        # The dense path without QuantLinear.forward's generality: weight-only layers run one F.linear on the cached
        # weight, layers with dynamic per-token activations (int8, FP8, ...) first quantize their input in one C pass
        # (bit-identical to ActQuantizer; FP8 layers at batch 1 spent most of their dense call in the module's Python).
        # A weight-only layer packed with kernel_activations="int8" quantizes its input on both paths, so its output
        # does not depend on which one dispatch picked.
        int8_kernel_input = layer.act is None and route.kernel.endswith("a8")
        self.plain = layer.act is None and layer.input_scale is None and layer.input_shift is None
        self.plain = self.plain and not int8_kernel_input
        fast_input = ACT_FORMATS["int8_token"] if int8_kernel_input else layer.act_spec
        self.fast_input: QuantSpec | None = fast_input if has_fast_path(fast_input) else None
        self.state: Any = None
        self.choice: dict[tuple[int, int], dict[str, Any]] = {}  # (bucket, threads) → what was measured
        self.decided: dict[tuple[int, int], bool] = {}  # (rows, threads) → native? (the per-call lookup)
        # `hot` serves layers whose input goes to the kernel untouched (no explicit input scale / shift).
        # (A convolution's input scale / shift is applied before its patches are cut: its patches are direct.)
        # (Setting an input scale / shift later drops the layer's LayerDispatch, so these stay true to the layer.)
        # A linear layer's input scale (no shift) is applied by the kernel itself (`layer.with_input_scale`): its input
        # goes to the C call untouched as well.
        patches = getattr(layer, "patch_kernel", False)
        self.kernel_scales = layer.input_scale is not None and layer.input_shift is None and not patches
        self.kernel_scales = self.kernel_scales and not getattr(layer, "_channels_first", True)  # linear layers
        self.unscaled = (layer.input_scale is None or self.kernel_scales) and layer.input_shift is None
        self.direct_input = patches or self.unscaled
        from lowbit.kernels import fastcall
        from lowbit.kernels import layer as native_layer
        from lowbit.kernels import native as native_lib

        self._linear = native_layer.linear
        # (the CPython entry where it could be built: ~0.5 µs less per call than the ctypes binding)
        self._lb_linear = fastcall.linear or native_lib._need().lb_linear
        self._lb_conv = fastcall.conv or native_lib._need().lb_conv
        self._empty = native_lib.empty_f32

    def hot(self, layer: Any, x: torch.Tensor) -> torch.Tensor | None:
        """The forward of a layer already decided for this input's (rows, threads) in ``auto`` mode, with nothing
        else on its path: the one C call (native) or one ``F.linear`` on the cached weight (plain dense: that is
        the layer's reference forward, whatever the input). ``None`` when anything needs the full `dispatch_linear`:
        another mode, compilation or tracing, a row count not decided yet, an input shift or an input scale the
        kernel does not apply itself (``kernel_scales``), an activation quantizer on the dense path, or for the
        kernel autograd or a non-fp32, strided or non-CPU input.

        A small layer's kernel takes a few microseconds, as long as a few Python calls, so this is the whole
        per-call cost of a decided layer (a MiniLM forward makes 37 of these calls, a digits ViT's 9)."""
        if _mode_override or _env_mode != "auto" or not self.direct_input:
            return None
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return None
        shape = x.shape
        k = shape[-1] if shape else 0
        rows = x.numel() // k if k else 0
        threads = torch.get_num_threads()
        native = self.decided.get((rows, threads))
        bias = layer_bias(layer)
        if native is False:
            # A plain layer's reference forward is exactly this (any dtype, device or autograd state is F.linear's).
            w = layer._cache if self.plain else None
            return F.linear(x, w, bias) if w is not None and w.device == x.device else None
        if native is None or x.dtype is not torch.float32 or not x.is_cpu or not x.is_contiguous():
            return None
        if x.requires_grad and torch.is_grad_enabled():
            return None
        st = self.state
        if st is None or k != st.K or not c_ready_bias(bias, st.N):
            return None
        return self._call(st, x, rows, threads, bias)

    def _call(
        self, st: Any, x: torch.Tensor, rows: int, threads: int, bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The C call alone (fast call entry, else ctypes) on fp32, contiguous CPU ``x`` of ``rows`` rows of st.K
        values, with a bias the C entry reads as it is (`c_ready_bias`) or None; None where the call failed
        (`layer.linear` raises the error)."""
        # Sizes as separate ints: torch.empty(rows, n) 0.8 µs here, torch.empty(*shape[:-1], n) 1.4.
        shape = x.shape
        y = self._empty(rows, st.N) if len(shape) == 2 else self._empty(*shape[:-1], st.N)
        b = None if bias is None else bias.data_ptr()
        if self._lb_linear(st.addr, x.data_ptr(), rows, y.data_ptr(), threads, b):
            return None
        return y

    def native_addr(self, layer: Any, rows: int, threads: int) -> int | None:
        """The address of the layer's C description when a call with ``rows`` input rows on ``threads`` threads
        would run the native kernel straight from its input (``auto``: decided native for these rows; ``native``
        / ``portable``: whenever its weights are prepared) with nothing to apply before it and a bias the C entries
        read as it is (`c_ready_bias`), for callers that chain kernels in C (`lowbit.nn.fused_blocks`); else None."""
        how = _mode_override[-1] if _mode_override else _env_mode
        if how not in ("auto", "native", "portable") or not self.direct_input or not self.unscaled:
            return None
        st = self.state
        if st is None or (how == "auto" and self.decided.get((rows, threads)) is not True):
            return None
        return st.addr if c_ready_bias(layer_bias(layer), st.N) else None

    def chained_addr(self, layer: Any, rows: int, threads: int) -> int | None:
        """`native_addr` for a caller that times its own chain of native kernels against the layers' chosen paths
        (`lowbit.nn.fused_blocks`: a whole block in one C call, where the calls between layers cost more than the
        layers): in ``auto`` mode the kernel's address once dispatch has decided these rows either way, its weights
        prepared now if the layer alone runs dense; in other modes `native_addr`."""
        how = _mode_override[-1] if _mode_override else _env_mode
        if how != "auto" or (rows, threads) not in self.decided:
            return self.native_addr(layer, rows, threads)
        if not self.direct_input or not self.unscaled:
            return None
        many_rows = 0 < self.route.panel_rows <= rows
        if self.state is None or (many_rows and not self.state.has_panels):  # (as `native` builds it)
            self.state = self.prepare(layer, many_rows)
        return self.state.addr if c_ready_bias(layer_bias(layer), self.state.N) else None

    def prepare(self, layer: Any, many_rows: bool) -> Any:
        """The layer's kernel description (`Route.prepare`; the many-row layout too when ``many_rows``), with its
        input scale where the kernel applies it."""
        st = self.route.prepare(layer, panels=True) if many_rows else self.route.prepare(layer)
        if self.kernel_scales:
            from lowbit.kernels import layer as native_layer

            st = native_layer.with_input_scale(st, layer.input_scale)
        return st

    def hot_conv(self, layer: Any, x: torch.Tensor, cut: Any) -> torch.Tensor | None:
        """`hot` for a convolution with per-patch activations whose patch count is decided native: patches, kernel
        and the move into an ``(N, O, OH, OW)`` map in one C call (`lb_conv`); ``cut``: the `kernels.im2col.Im2col` of
        this input's shape and strides. ``None`` where `hot` would say None, or when the patches go dense."""
        if _mode_override or _env_mode != "auto":
            return None
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return None
        threads = torch.get_num_threads()
        if self.decided.get((cut.rows, threads)) is not True:
            return None
        if x.dtype is not torch.float32 or not x.is_cpu or (x.requires_grad and torch.is_grad_enabled()):
            return None
        return self.conv_call(layer, x, cut, threads)

    def conv_call(self, layer: Any, x: torch.Tensor, cut: Any, threads: int) -> torch.Tensor | None:
        """The whole convolution in one C call (`lb_conv`: patches, kernel, output map) on fp32 CPU input ``x``,
        whatever was decided; None where it cannot run (no prepared weights for these patches, a bias the C entry
        cannot read as it is: `c_ready_bias`)."""
        bias = layer_bias(layer)
        st = self.state
        if st is None or cut.k != st.K or not c_ready_bias(bias, st.N):
            return None
        y = self._empty(*cut.map_shape)
        b = None if bias is None else bias.data_ptr()
        if self._lb_conv(st.addr, x.data_ptr(), cut.geometry_addr, y.data_ptr(), threads, b):
            return None  # the full path raises the error
        return y

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        # A copied or pickled layer derives its route again (the prepared state holds raw pointers into this
        # layer's tensors, which a copy must not share): the copy's ``_dispatch`` is ``False``.
        return bool, ()

    def native(self, layer: Any, x: torch.Tensor, threads: int) -> torch.Tensor:
        """The kernel's output on ``x``: the input after the layer's scale / shift, or as given where the kernel
        applies the scale (``kernel_scales``)."""
        st, many = self.state, self.route.panel_rows
        many_rows = many > 0 and x.numel() >= many * x.shape[-1]
        if st is None or (many_rows and not st.has_panels):
            # Built on first use; the many-row layout (`kernels.panels`) on the first call with enough rows, then kept.
            self.state = st = self.prepare(layer, many_rows)
        # The decided forward's own C call where the input allows (dispatch races this against the dense path:
        # the checked ctypes call below cost ~2 µs more, a fifth of a small layer's time, and tipped close races).
        bias = layer_bias(layer)
        if x.dtype is torch.float32 and x.is_contiguous() and x.is_cpu and x.dim() and x.shape[-1] == st.K:
            if c_ready_bias(bias, st.N):
                y = self._call(st, x, x.numel() // st.K, threads, bias)
                if y is not None:
                    return y
        return self._linear(st, x, threads, bias)

    def _native_call(self, layer: Any, x: torch.Tensor, threads: int) -> Callable[[], Any]:
        """The native path on ``x`` as a decided call runs it, for the race: once the weights are prepared (this
        first `native` call), the bare C call (`_call`) where `hot` would make it -- `native`'s own checks cost ~0.5 µs
        more, which a decided call does not pay (a 10-output head's kernel is ~2 µs: the race measured it slower
        than ``F.linear`` while in steady state it is faster) -- else `native` itself."""
        self.native(layer, x, threads)
        st, bias = self.state, layer_bias(layer)
        k = x.shape[-1] if x.dim() else 0
        direct = x.dtype is torch.float32 and x.is_cpu and x.is_contiguous() and k == st.K and c_ready_bias(bias, st.N)
        if not direct or (x.requires_grad and torch.is_grad_enabled()):
            return lambda: self.native(layer, x, threads)
        rows = x.numel() // k
        if self._call(st, x, rows, threads, bias) is None:  # (a failed C call: `native` raises its error)
            return lambda: self.native(layer, x, threads)
        return lambda: self._call(st, x, rows, threads, bias)

    def _hot_calls(
        self, layer: Any, x: torch.Tensor, rows: int, threads: int
    ) -> tuple[Callable[[], Any], Callable[[], Any]] | None:
        """A plain layer's two decided forwards on ``x`` exactly as `hot` runs them (native: its checks and the C
        call; dense: one ``F.linear`` on the cached weight), for the race: on a 10-output head both take ~2-3 µs, and
        the checks on the native side (~0.3 µs) decide a close race. None where `hot` would not serve this input."""
        key = (rows, threads)

        def as_decided(native: bool) -> Callable[[], Any]:
            def call() -> Any:
                self.decided[key] = native
                return self.hot(layer, x)

            return call

        calls = as_decided(True), as_decided(False)
        if any(c() is None for c in calls):
            self.decided.pop(key, None)
            return None
        return calls

    def dense(self, layer: Any, x: torch.Tensor, xt: torch.Tensor, dense: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The dense path on input ``x`` (``xt``: ``x`` after the layer's input scale / shift, already computed)."""
        if not self.plain and self.fast_input is None:
            return dense()
        w = layer._cache
        if w is None:
            w = layer.weight_matrix()
        if not w.is_cpu:
            return dense()
        if self.plain:
            return F.linear(x, w, layer.bias)
        if self.fast_input is not None:
            xq = fake_quantize_fast(xt.float(), self.fast_input)
            return dense() if xq is None else F.linear(xq, w, layer.bias).to(x.dtype)
        return dense()

    def decide(
        self,
        layer: Any,
        x: torch.Tensor,
        xt: torch.Tensor,
        rows: int,
        threads: int,
        dense: Callable[[], torch.Tensor],
        how: str,
        whole: Callable[[LayerDispatch], WholeCalls | None] | None = None,
    ) -> bool:
        """Native or dense for ``rows`` input rows (``xt``: the input after the layer's scale / shift): measured
        once per batch bucket in ``auto`` mode. ``whole``: for a convolution on its patches, its two whole calls
        (native: `conv_call`; dense: patches, dense product, output map) given this dispatch: raced instead of the
        two paths on the patches alone, which leave out what the one C call saves."""
        key = (bucket(rows), threads)
        if how != "auto":
            self.choice.setdefault(key, {"native_ms": None, "dense_ms": None, "fp32_ms": None, "native": True})
            return True
        c = self.choice.get(key)
        if c is None or c["native_ms"] is None:
            w = layer.weight_matrix()  # what an fp32 layer of this shape costs (for the report, not the choice)
            native_fn = self._native_call(layer, x if self.kernel_scales else xt, threads)
            # (a decided plain layer's dense forward is one F.linear: that is what it races)
            plain = self.plain and w.is_cpu
            dense_fn: Callable[[], Any] = (
                (lambda: F.linear(x, w, layer_bias(layer))) if plain else (lambda: self.dense(layer, x, xt, dense))
            )
            fp32_fn: Callable[[], Any] = lambda: F.linear(xt, w, layer.bias)  # noqa: E731
            hot = self._hot_calls(layer, x, rows, threads) if plain and not _mode_override else None
            if hot is not None:
                native_fn, dense_fn = hot
            # (an overridden mode, `use_mode`, takes the patches' path: `hot_conv` serves only plain auto mode)
            calls = whole(self) if whole is not None and not _mode_override else None
            if calls is not None:  # (the kernel's weights for these rows are prepared: `_native_call`)
                if calls[0]() is not None:
                    native_fn, dense_fn, fp32_fn = calls
            try:
                native_ms, dense_ms, fp32_ms = race(native_fn, dense_fn, fp32_fn)
            except BaseException:
                self.decided.pop((rows, threads), None)  # (`_hot_calls` set it while racing)
                raise
            c = self.choice[key] = {
                "native_ms": native_ms,
                "dense_ms": dense_ms,
                "fp32_ms": fp32_ms,
                "native": native_ms < dense_ms,
                "rows_seen": rows,  # the rows the race ran on (the kernel layout depends on them)
            }
            # Keep only the weights the chosen paths need: the dequantized fp32 cache or the kernel layout.
            if c["native"]:
                layer._cache = None
                if getattr(layer, "_conv_weight", None) is not None:
                    layer._conv_weight = (None, None)  # (a conv's 4-D view of that weight, and the weight)
            elif not any(v["native"] for v in self.choice.values()):
                self.state = None
            large = (w.numel() + rows * w.shape[0]) * w.element_size() >= TRIM_BYTES
            del w, native_fn, dense_fn, fp32_fn, hot, calls  # (what holds the weight and the race's outputs)
            if large:
                release_free_heap()  # (the race's temporaries and the dropped weights: see `kernels.heap`)
        self.decided[(rows, threads)] = c["native"]
        return c["native"]


_op_layers: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()


@torch.compiler.assume_constant_result
def _op_key(layer: Any) -> int:
    """The key under which the compiled graph's ``lowbit::packed_linear`` call finds ``layer`` (run at trace time,
    its result baked into the graph as a constant)."""
    _op_layers[id(layer)] = layer
    return id(layer)


def packed_linear_op(x: torch.Tensor, layer_key: int, n_out: int) -> torch.Tensor:
    """``lowbit::packed_linear``: a packed linear layer inside a compiled graph, i.e. its eager forward (dispatch to
    the native kernel or the dense path) on ``x`` (..., K), giving (..., ``n_out``). ``layer_key`` comes from
    `_op_key` at trace time."""
    return _traced_layer(layer_key, "packed_linear").forward(x)


def _traced_layer(layer_key: int, op: str) -> Any:
    """The packed layer a compiled graph's ``lowbit::<op>`` call was traced with."""
    layer = _op_layers.get(layer_key)
    if layer is None:
        raise RuntimeError(
            f"lowbit::{op}: the packed layer this compiled graph was traced with no longer exists; "
            "compile the model again"
        )
    return layer


# Registered with the low-level `torch.library.Library` rather than `torch.library.custom_op`: a call through the
# latter's wrapper costs ~45 µs here, this one ~13 µs (a MiniLM forward calls it 37 times).
_lib = torch.library.Library("lowbit", "DEF")
_lib.define("packed_linear(Tensor x, int layer_key, int n_out) -> Tensor")
_lib.impl("packed_linear", packed_linear_op, "CPU")


@torch.library.register_fake("lowbit::packed_linear", lib=_lib)
def _packed_linear_shape(x: torch.Tensor, layer_key: int, n_out: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], n_out))


def packed_conv_op(x: torch.Tensor, layer_key: int, n_out: int, out_hw: list[int]) -> torch.Tensor:
    """``lowbit::packed_conv``: a packed convolution with per-patch activations inside a compiled graph, i.e. its
    eager forward (patches cut in C, kernel or dense path) on ``x`` (N, C, H, W), giving (N, ``n_out``, *out_hw)."""
    return _traced_layer(layer_key, "packed_conv").forward(x)


_lib.define("packed_conv(Tensor x, int layer_key, int n_out, SymInt[] out_hw) -> Tensor")
_lib.impl("packed_conv", packed_conv_op, "CPU")


@torch.library.register_fake("lowbit::packed_conv", lib=_lib)
def _packed_conv_shape(x: torch.Tensor, layer_key: int, n_out: int, out_hw: list[int]) -> torch.Tensor:
    return x.new_empty((x.shape[0], n_out, *out_hw))


def compiled_conv(layer: Any, x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor | None:
    """While a graph is being compiled: a per-patch packed conv as one opaque ``lowbit::packed_conv`` call (its
    eager forward, native kernels included, when the graph runs), or None where the graph must record the
    reference path (export, ``reference`` mode, autograd, a non-CPU input)."""
    how = _mode_override[-1] if _mode_override else _env_mode or mode()
    if torch.compiler.is_exporting() or how == "reference" or (x.requires_grad and torch.is_grad_enabled()):
        return None
    if not x.is_cpu:
        return None
    return torch.ops.lowbit.packed_conv(x, _op_key(layer), layer.out_channels, list(out_hw))


def dense_hot(layer: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The reference forward of a packed linear layer that has no native route (its ``_dispatch`` is None: FP6,
    int6, ...) in its fewest steps, in ``auto`` mode: the activation quantizer's C pass
    (`fake_quantize_fast`, the values of `ActQuantizer`) and one ``F.linear`` on the cached dequantized weight. A small
    layer's reference forward spends more time in Python than in its matrix product; this is that forward less its
    calls. None where it does not apply (another mode, compiling or tracing, autograd, an input scale / shift, no
    cached weight, an activation quantizer that is static, observing or hooked, an input the C pass does not take):
    the caller runs the full reference forward."""
    if _mode_override or _env_mode != "auto" or torch.compiler.is_compiling():
        return None
    if torch._C._get_tracing_state() is not None or (x.requires_grad and torch.is_grad_enabled()):
        return None
    w = layer._cache
    if w is None or w.device != x.device or layer.weight_fp is not None:
        return None
    if layer.input_scale is not None or layer.input_shift is not None:
        return None
    act = layer.act
    if act is None:
        return F.linear(x, w, layer.bias)
    if act.observing or not act.spec.dynamic or act._forward_hooks or act._forward_pre_hooks:
        return None
    xq = fake_quantize_fast(x, act.spec)
    return None if xq is None else F.linear(xq, w, layer.bias)


def dispatch_linear(
    layer: Any,
    x: torch.Tensor,
    transform: Callable[[torch.Tensor], torch.Tensor],
    dense: Callable[[], torch.Tensor],
    whole: Callable[[LayerDispatch], WholeCalls | None] | None = None,
) -> torch.Tensor:
    """Output of packed linear ``layer`` on ``x``: native kernel or ``dense()`` (the reference forward).

    ``transform`` applies the layer's input scale / shift (everything before activation quantization). This is
    on every forward's path, so a decided call does little more than one dict lookup and one C call. ``whole``:
    a convolution's whole calls, raced when its patch count is decided (`LayerDispatch.decide`).
    """
    how = _mode_override[-1] if _mode_override else _env_mode or mode()
    if torch.compiler.is_compiling():
        exporting = torch.compiler.is_exporting()
        if exporting or how == "reference" or (x.requires_grad and torch.is_grad_enabled()) or not x.is_cpu:
            return dense()
        return torch.ops.lowbit.packed_linear(x, _op_key(layer), layer._matrix_shape[0])
    disp: LayerDispatch | None | bool = layer._dispatch
    # torch.jit.trace cannot see a C call writing into a tensor (its graph would keep an uninitialised output), so
    # a traced layer runs its reference path (compilation was handled above).
    tracing = torch._C._get_tracing_state() is not None
    if how == "reference" or (x.requires_grad and torch.is_grad_enabled()) or not x.is_cpu or tracing:
        return dense()
    if disp is False:
        route = route_for(layer)
        if route is None and awaits_calibration(layer):
            return dense()  # (which says so; the route is looked for again once the range is calibrated)
        disp = LayerDispatch(route, layer) if route is not None and _native_ready() else None
        layer._dispatch = disp
    if disp is None:
        return dense()
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0  # (the scale / shift keeps the shape)
    threads = torch.get_num_threads()
    use_native = disp.decided.get((rows, threads)) if how == "auto" else None
    xt = None
    if use_native is None:
        xt = transform(x)
        use_native = disp.decide(layer, x, xt, rows, threads, dense, how, whole)
    if not use_native:
        return disp.dense(layer, x, transform(x) if xt is None else xt, dense)
    x_in = x if disp.kernel_scales else transform(x) if xt is None else xt  # (the kernel applies its own scale)
    y = disp.native(layer, x_in, threads)  # (..., N) straight from (..., K): no reshapes on the hot path
    return y if x.dtype == torch.float32 else y.to(x.dtype)
