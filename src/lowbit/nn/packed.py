"""Packed quantized layers: codes stored at their real bit width, scales at fp16, integer zero points packed.

`PackedLinear` / `PackedConv2d` compute what the simulated `QuantLinear` / `QuantConv2d` compute, but their state
dict holds only the packed bytes, so a saved checkpoint is as small as the format says: within a few bytes of
``codes·bits + scales·16 (+ zeros)``. Two kernels: the reference kernel unpacks once, caches the dequantized weight
and gives bit-identical outputs; a `PackedLinear` whose format has a native CPU kernel (`lowbit.kernels`) runs it
where dispatch measured it faster, agreeing with the reference up to float rounding of the final rescale.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import lowbit
    >>> from lowbit.pack import pack
    >>> m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4))
    >>> q = lowbit.compress(m, "w3g64", progress=False)
    >>> p = pack(q)
    >>> x = torch.randn(2, 64)
    >>> from lowbit.kernels.dispatch import use_mode
    >>> with use_mode("reference"):
    ...     torch.equal(p(x), q(x)), p[1].packed_codes.numel()  # 64·64 codes × 3 bits = 1536 bytes
    (True, 1536)
    >>> bool((p(x) - q(x)).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.formats.layout import num_units
from lowbit.formats.packing import code_offset, pack_codes, packed_nbytes, unpack_codes
from lowbit.formats.spec import QuantSpec
from lowbit.kernels.dispatch import compiled_conv, dense_hot, dispatch_linear, native_patches_ready
from lowbit.kernels.dispatch import mode as dispatch_mode
from lowbit.nn.patches import conv_output_size, conv_padding, conv_patches, patches_to_map
from lowbit.nn.qlayers import QuantConv2d, QuantLayer, QuantLinear


class PackedMixin:
    """Turns a quantized layer's codes / scale / zero buffers into derived (non-persistent) ones rebuilt from
    persistent packed buffers.

    The codes are held packed only: ``layer.codes`` unpacks them on each read (a new tensor: writing into it
    changes nothing; `set_qweight` installs new codes). An unpacked copy took a byte a weight for as long as the
    layer lived -- twice the packed bytes of a 4-bit layer, eight times a binary one's. A graph traced or exported
    from a packed layer whose dequantized weight is not cached yet unpacks them on each call of that graph (it
    carries the packed bytes only)."""

    def _init_packed(self, zero_format: str | None) -> None:
        spec: QuantSpec = self.weight_spec  # type: ignore[attr-defined]
        rows, cols = self._matrix_shape  # type: ignore[attr-defined]
        bits, _ = code_offset(spec)
        units = num_units((rows, cols), spec.granularity, spec.group_size)
        n_units = units[0] * units[1]
        self.register_buffer("packed_codes", torch.zeros(packed_nbytes(rows * cols, bits), dtype=torch.uint8))
        self.register_buffer("packed_scale", torch.ones(units, dtype=torch.float16))
        self.zero_format = zero_format
        if zero_format == "packed":
            self.register_buffer("packed_zero", torch.zeros(packed_nbytes(n_units, spec.bits), dtype=torch.uint8))
        elif zero_format == "fp16":
            self.register_buffer("packed_zero", torch.zeros(units, dtype=torch.float16))
        for name in ("codes", "scale", "zero"):
            if name in self._buffers:  # type: ignore[attr-defined]
                self._non_persistent_buffers_set.add(name)  # type: ignore[attr-defined]
        self._drop_unpacked_codes()

    def _drop_unpacked_codes(self) -> None:
        """The ``codes`` buffer emptied (its dtype kept for `codes`): the packed bytes are the layer's codes."""
        buffers = self._buffers  # type: ignore[attr-defined]
        if buffers.get("codes") is not None:
            self._code_dtype = buffers["codes"].dtype
            buffers["codes"] = None

    @property
    def codes(self) -> torch.Tensor:
        """The codes as an ``(out, in·kh·kw)`` matrix, unpacked from ``packed_codes`` on each read. (A property, not
        a ``__getattr__``: every other attribute of the layer is found as fast as before.)"""
        buffers = self.__dict__.get("_buffers")
        held = buffers.get("codes") if buffers is not None else None
        if held is not None:  # (during construction, before the codes are packed)
            return held
        if buffers is None or "packed_codes" not in buffers:
            raise AttributeError("codes")
        return self._unpacked_codes()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if self.__dict__.get("_buffers", {}).get("packed_codes") is not None:
            self._drop_unpacked_codes()  # (a layer pickled before its codes were held packed only: the copy goes)

    def _unpacked_codes(self) -> torch.Tensor:
        """The layer's codes as an ``(out, in·kh·kw)`` int8 / uint8 matrix, unpacked from ``packed_codes``."""
        bits, signed = code_offset(self.weight_spec)  # type: ignore[attr-defined]
        packed = self._buffers["packed_codes"]  # type: ignore[attr-defined]
        codes = unpack_codes(packed, self._matrix_shape, bits, signed)  # type: ignore[attr-defined]
        return codes.to(device=packed.device, dtype=self._code_dtype)

    def set_qweight(self, qt: Any) -> None:
        """Install quantized codes and scales: packed, with scales (and real zero points) rounded to fp16 as a saved
        checkpoint holds them; the kernel layouts and dispatch timings are rebuilt on the next call. Codes that do
        not fit the format's bits are refused before anything changes."""
        packed = self._packed(qt.codes)  # (checks the codes first)
        super().set_qweight(qt)  # type: ignore[misc]  # (checks the shapes; sets scale and zero)
        with torch.no_grad():
            self._pack_from_storage(qt.codes, packed)
            self._unpack_into_storage()

    def _store_codes(self, codes: torch.Tensor) -> None:
        pass  # (`set_qweight` packs them once the scales are in)

    def _packed(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` packed at the format's width (ValueError where their shape or values do not fit)."""
        bits, signed = code_offset(self.weight_spec)  # type: ignore[attr-defined]
        shape = tuple(self._matrix_shape)  # type: ignore[attr-defined]
        if tuple(codes.shape) != shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit {shape}")
        return pack_codes(codes.detach().cpu(), bits, signed)

    def _pack_from_storage(self, codes: torch.Tensor, packed: torch.Tensor | None = None) -> None:
        """Pack ``codes`` (or take them as ``packed`` already) and the layer's scale (and zero points) into the
        persistent buffers."""
        spec: QuantSpec = self.weight_spec  # type: ignore[attr-defined]
        self.packed_codes.copy_(self._packed(codes) if packed is None else packed)
        self.packed_scale.copy_(self.scale.to(torch.float16))
        if self.zero_format == "packed":
            self.packed_zero.copy_(pack_codes(self.zero.round().to(torch.int64).cpu(), spec.bits, False))
        elif self.zero_format == "fp16":
            self.packed_zero.copy_(self.zero.to(torch.float16))

    def _unpack_into_storage(self) -> None:
        """Scale and zero points from their packed buffers (the codes stay packed: see `codes`)."""
        spec: QuantSpec = self.weight_spec  # type: ignore[attr-defined]
        bits, _ = code_offset(spec)
        rows, cols = self._matrix_shape  # type: ignore[attr-defined]
        if self.packed_codes.numel() != packed_nbytes(rows * cols, bits):
            raise ValueError(
                f"packed codes of {self.packed_codes.numel()} bytes, {packed_nbytes(rows * cols, bits)} expected for "
                f"{rows} x {cols} codes of {bits} bits"
            )
        self.scale.copy_(self.packed_scale.float())
        if self.zero_format == "packed":
            self.zero.copy_(unpack_codes(self.packed_zero, tuple(self.zero.shape), spec.bits, False).float())
        elif self.zero_format == "fp16":
            self.zero.copy_(self.packed_zero.float())
        self._cache = None
        self._dispatch = False  # kernel layout and timings are rebuilt for the new weights

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
        if prefix + "packed_codes" in state_dict:
            self._unpack_into_storage()

    def packed_spec(self) -> dict[str, Any]:
        return {"packed": True, "zero_format": self.zero_format}


def zero_format_of(layer: QuantLayer) -> str | None:
    """How a layer's zero points are packed: integers at the code width, real numbers at fp16, or none."""
    if getattr(layer, "zero", None) is None:
        return None
    return "packed" if bool(torch.equal(layer.zero, layer.zero.round())) else "fp16"


class PackedLinear(PackedMixin, QuantLinear):
    """`QuantLinear` stored bit-packed; its forward runs a native kernel where one is faster (`lowbit.kernels`)."""

    def __init__(self, *args: Any, zero_format: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_packed(zero_format)
        self._dispatch: Any = False
        self.kernel_activations = "exact"  # or "int8": see lowbit.pack

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        disp = self._dispatch
        if disp:
            y = disp.hot(self, x)
            if y is not None:
                return y
        elif disp is None:  # no native route (FP6, int6, ...): the reference forward, in fewer steps where it can
            y = dense_hot(self, x)
            if y is not None:
                return y
        return dispatch_linear(self, x, self._scale_shift_input, lambda: QuantLinear.forward(self, x))


class PackedConv2d(PackedMixin, QuantConv2d):
    """`QuantConv2d` stored bit-packed. With per-token (per-patch) activations, a static per-tensor int8 range or
    none (weight-only; `QuantConv2d.patch_kernel`), and ``groups=1`` it runs as a packed linear layer over the
    input's patches (`lowbit.nn.patches`; patches cut in one C pass), so dispatch picks a native kernel where one is
    faster (static and weight-only convs: raced against the conv on the map); otherwise its forward is the reference
    one on the cached weight."""

    def __init__(self, *args: Any, zero_format: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_packed(zero_format)
        self._dispatch: Any = False
        self._conv_weight: tuple[Any, Any] = (None, None)  # 4-D view of the cached dequantized weight, that weight
        self._im2col: dict[tuple, Any] = {}  # (input shape, strides) → its C patch cutter (`kernels.im2col.Im2col`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        disp = self._dispatch
        if self.act is None and self.input_scale is None and self.input_shift is None:
            # Weight-only, with no kernel route or decided dense for this input: the conv on the cached weight's
            # 4-D view, first and in the fewest steps -- a small conv takes a few microseconds, the checks below one
            # more. Decided native: the one C call.
            w, of = self._conv_weight
            cached = of is not None and of is self._cache and of.device == x.device
            if cached and disp is None:
                return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
            cut = self._im2col.get((x.shape, x.stride())) if disp else None
            if cut is not None:
                native = disp.decided.get((cut.rows, torch.get_num_threads()))
                if native is False and cached and dispatch_mode() == "auto":
                    return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
                y = disp.hot_conv(self, x, cut) if native else None
                if y is not None:
                    return y
        cut = None
        if disp and disp.unscaled:  # a per-patch conv with a kernel route, input used as is: try the one C call
            cut = self._im2col.get((x.shape, x.stride()))
            y = None if cut is None else disp.hot_conv(self, x, cut)
            if y is not None:
                return y
        if self.patch_tokens:
            return self._patch_forward(x)
        if self._patches_serve(x) and self._static_patches(disp, cut):
            return self._patch_forward(x, map_dense=True)
        # QuantConv2d.forward less its per-call bookkeeping (a small conv takes ~20 µs, the bookkeeping ~10):
        # the 4-D weight view is kept while the cached weight is the same tensor.
        c = self._cache
        if c is None or c.device != x.device or self.input_scale is not None or self.input_shift is not None:
            return QuantConv2d.forward(self, x)
        w, of = self._conv_weight
        if of is not c:
            w = c.view(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            self._conv_weight = (w, c)
        act = self.act
        xq = x if act is None else act(x)
        return F.conv2d(xq, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _static_patches(self, disp: Any, cut: Any) -> bool:
        """Whether a conv with a static activation range runs on its patches: where its weights have a native
        kernel (`QuantConv2d.patch_kernel`: the same codes per patch as per map), outside ``reference`` mode, and
        not for an input whose patch count dispatch has decided dense (the map conv then runs at once)."""
        how = dispatch_mode()
        if disp is None or how == "reference":
            return False
        if disp is False:
            from lowbit.kernels.routes import route_for

            # (dispatch derives the route on the first patches)
            route = route_for(self) if self.patch_kernel else None
            if route is None and self.act is None:
                self._dispatch = None  # weight-only, no kernel for it: the conv on the cached weight from now on
            return route is not None
        if how == "auto" and cut is not None and disp.decided.get((cut.rows, torch.get_num_threads())) is False:
            return False
        return self.patch_kernel

    def _patches_serve(self, x: torch.Tensor) -> bool:
        """Whether a static or weight-only conv's patch path can run its kernel on ``x`` (the map conv is its dense
        path): a batched fp32 CPU input, no autograd or ``torch.jit.trace`` (which dispatch serves densely), and for
        a weight-only conv no input scale / shift (whose decided-dense calls would cut their patches for nothing).
        Otherwise the conv on the map runs at once -- as it did before weight-only convs had kernels: cutting the
        patches of a training step only to discard them cost 5x its time."""
        if x.dim() != 4 or x.dtype is not torch.float32 or not x.is_cpu:
            return False
        if (x.requires_grad and torch.is_grad_enabled()) or torch._C._get_tracing_state() is not None:
            return False
        return self.act is not None or (self.input_scale is None and self.input_shift is None)

    def _patch_forward(self, x: torch.Tensor, map_dense: bool = False) -> torch.Tensor:
        """The conv as a linear layer on its patches; ``map_dense``: the dense path is the conv on the quantized map
        (a static range: the simulated layer's own forward, so dispatch races the kernel against it)."""
        if self.groups != 1:
            return QuantConv2d.forward(self, x)
        if torch.compiler.is_compiling():  # one opaque op: inductor's patches (unfold) are slower than the C ones
            size = (x.shape[2], x.shape[3])
            pads = conv_padding(size, self.kernel_size, self.dilation, self.padding)
            y = compiled_conv(self, x, conv_output_size(size, self.kernel_size, self.stride, pads, self.dilation))
            if y is not None:
                return y
        x = self._scale_shift_input(x)
        disp = self._dispatch
        if disp and not disp.unscaled:  # (an unscaled input's one-call path was tried in forward)
            cut = self._im2col.get((x.shape, x.stride()))
            y = None if cut is None else disp.hot_conv(self, x, cut)  # decided: one C call for the whole conv
            if y is not None:
                return y
        u, (oh, ow) = self._patches(x)
        dense = None
        if map_dense:

            def dense() -> torch.Tensor:  # the map conv's output as (N, OH·OW, O) rows (a view)
                y = F.conv2d(
                    self._map_input(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
                )
                return y.flatten(2).transpose(1, 2)

        return patches_to_map(self.patch_linear(u, dense, self._whole_calls(x, map_dense)), oh, ow)

    def _map_input(self, x: torch.Tensor) -> torch.Tensor:
        """The map the dense conv reads: the input after its static activation quantizer, or as it is (weight-only)."""
        return x if self.act is None else self.act(x)

    def patch_linear(self, u: torch.Tensor, dense: Any = None, whole: Any = None) -> torch.Tensor:
        """The layer on its input's patches ``(N, OH·OW, in·kh·kw)`` → ``(N, OH·OW, out)``: a packed linear layer's
        forward: dispatch to a native kernel or the dense path (``dense()``, by default the patches' product);
        ``whole``: the conv's whole calls for dispatch's race (`_whole_calls`)."""
        disp = self._dispatch
        y = disp.hot(self, u) if disp else None
        if y is None:
            fallback = dense or (lambda: F.linear(self._map_input(u), self.weight_matrix(), self.bias))
            y = dispatch_linear(self, u, _unchanged, fallback, whole)
        return y

    def _whole_calls(self, x: torch.Tensor, map_dense: bool) -> Any:
        """For dispatch's race on input ``x`` (after the conv's input scale / shift, if any): given its dispatch,
        the one C call `forward` makes once decided native (`LayerDispatch.conv_call`), the whole dense path it
        runs otherwise (patches, their dense product, the output map; or, ``map_dense``, the map conv) and an fp32
        conv of its shape (the report's reference, not part of the choice), or None
        where the one C call cannot serve this input. Racing the patches' products alone left out the cutting and
        the map: a 1-channel 3×3 conv at batch 32 went dense and ran 0.57× fp32 where the one C call is faster."""

        def calls(disp: Any) -> Any:
            cut = self._im2col.get((x.shape, x.stride()))
            if cut is None or x.dtype is not torch.float32 or not x.is_cpu:
                return None
            threads = torch.get_num_threads()
            args = (self.stride, self.padding, self.dilation, self.groups)
            w = self.weight  # the dequantized 4-D weight: an fp32 conv of this shape, for the report

            def dense_whole() -> torch.Tensor:
                if map_dense:
                    return F.conv2d(self._map_input(x), self.weight, self.bias, *args)
                v = cut(x, threads)
                y = disp.dense(self, v, v, lambda: F.linear(self._map_input(v), self.weight_matrix(), self.bias))
                return patches_to_map(y, *cut.out_size)

            return (
                (lambda: disp.conv_call(self, x, cut, threads)),
                dense_whole,
                lambda: F.conv2d(x, w, self.bias, *args),
            )

        return calls

    def _patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The input's patches: one C pass where it can run, `conv_patches` otherwise (same values)."""
        grad = x.requires_grad and torch.is_grad_enabled()
        if x.dtype is not torch.float32 or not x.is_cpu or x.dim() != 4 or grad or not native_patches_ready():
            return conv_patches(x, self.kernel_size, self.stride, self.padding, self.dilation)
        key = (x.shape, x.stride())
        cut = self._im2col.get(key)
        if cut is None:
            from lowbit.kernels.im2col import Im2col

            if len(self._im2col) >= 64:  # inputs of many sizes: keep the cache small
                self._im2col.clear()
            size = (x.shape[2], x.shape[3])
            pads = conv_padding(size, self.kernel_size, self.dilation, self.padding)
            out = conv_output_size(size, self.kernel_size, self.stride, pads, self.dilation)
            cut = self._im2col[key] = Im2col(
                x.shape, x.stride(), self.kernel_size, self.stride, pads, self.dilation, out, self.out_channels
            )
        return cut(x, torch.get_num_threads()), cut.out_size


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x  # a conv's input scale / shift is applied per channel before its patches are cut
