"""`Im2col`: a convolution's input patches cut in one C pass (`lb_im2col`), the geometry converted for C once.

Example:
    >>> import torch
    >>> from lowbit.kernels import native
    >>> from lowbit.nn.patches import conv_patches
    >>> x = torch.randn(1, 2, 5, 5)
    >>> if native.available():
    ...     from lowbit.kernels.im2col import Im2col
    ...     cut = Im2col(x.shape, x.stride(), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), (5, 5))
    ...     torch.equal(cut(x), conv_patches(x, (3, 3), (1, 1), (1, 1), (1, 1))[0])
    ... else:
    ...     True
    True
"""

from __future__ import annotations

import ctypes

import torch

from lowbit.kernels.native import _need, empty_f32


class Im2col:
    """Patches of fp32 ``(N, C, H, W)`` maps of one shape and strides as ``(N, OH·OW, C·kh·kw)``, cut in one C pass:
    the same values as `lowbit.nn.patches.conv_patches` (``pads``: top, bottom, left, right; ``out_size``: OH,
    OW; ``n_out``: the output channels of the conv that reads them, for `lb_conv`). The geometry is converted for C
    once, here: a small convolution's patches take ~10 µs, as long as converting its 18 integers on every call
    would."""

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        strides: tuple[int, int, int, int],
        kernel: tuple[int, int],
        stride: tuple[int, int],
        pads: tuple[int, int, int, int],
        dilation: tuple[int, int],
        out_size: tuple[int, int],
        n_out: int = 0,
    ) -> None:
        self._args = (tuple(shape), tuple(strides), tuple(kernel), tuple(stride), tuple(pads), tuple(dilation))
        self._args += (tuple(out_size), n_out)
        n, c, h, w = shape
        oh, ow = out_size
        self.shape, self.strides = tuple(shape), tuple(strides)
        self.out_size, self.rows, self.k = (oh, ow), n * oh * ow, c * kernel[0] * kernel[1]
        self.out_shape = (n, oh * ow, self.k)
        self.map_shape = (n, n_out, oh, ow)  # the output map of a conv with n_out channels on these patches
        #: the geometry as `lb_im2col` / `lb_conv` read it
        self.geometry = (ctypes.c_int64 * 18)(
            n, c, h, w, *strides, *kernel, *stride, pads[0], pads[2], *dilation, oh, ow
        )
        self.geometry_addr = ctypes.addressof(self.geometry)  # (what `fastcall.conv` takes)
        self._fn = _need().lb_im2col

    def __reduce__(self) -> tuple[type, tuple]:
        return Im2col, self._args  # a copy builds its own C geometry

    def __call__(self, x: torch.Tensor, threads: int = 1) -> torch.Tensor:
        if x.dtype is not torch.float32 or tuple(x.shape) != self.shape or x.stride() != self.strides:
            raise ValueError(f"this Im2col cuts fp32 maps of shape {self.shape}, strides {self.strides}")
        out = empty_f32(*self.out_shape)
        self._fn(x.data_ptr(), self.geometry, out.data_ptr(), threads)
        return out
