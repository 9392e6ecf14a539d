"""A convolution as a matrix product over patches, the view in which its activations are quantized per token.

A convolution is the matrix product of its weight ``(out, in/groups·kh·kw)`` with the input's patches: one row
per output position holding the ``in·kh·kw`` input values (channel-major, then kernel row, then column — the
order of ``F.unfold`` and of the weight's flattening) that the kernel sees there, zero where it overlaps the
padding. lowbit's *per-token* activation quantization of a convolution is per row of this matrix (per output
position), as in XNOR-Net, whose binary convolution scales each output position by the mean ``|x|`` of its
receptive field (the paper's ``K``). With one scale per patch the scale factors out of the patch's dot product,
so an integer (or XNOR-popcount) matrix kernel computes the quantized convolution exactly; a scale per pixel or per
image row would not factor out of the sum. Padding is zero *before* quantization: integer codes keep it at 0,
binary activations read it as +1 (Larq's ``pad_values=1``), which is what a 1-bit kernel can store.

These are pure tensor functions (autograd flows through them), shared by the simulated, QAT and packed layers.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from lowbit.nn.patches import conv_patches, patch_linear, patches_to_map
    >>> x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    >>> u, (oh, ow) = conv_patches(x, (3, 3), (1, 1), (1, 1), (1, 1))
    >>> tuple(u.shape), (oh, ow)
    ((2, 25, 27), (5, 5))
    >>> y = patches_to_map(patch_linear(u, w.reshape(4, -1), None, 1), oh, ow)
    >>> bool(torch.allclose(y, F.conv2d(x, w, padding=1), atol=1e-5))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_padding(
    size: tuple[int, int], kernel: tuple[int, int], dilation: tuple[int, int], padding: tuple[int, int] | str
) -> tuple[int, int, int, int]:
    """Explicit ``(top, bottom, left, right)`` padding of a convolution; ``"same"`` puts the odd pixel at the end,
    as PyTorch does, ``"valid"`` pads nothing."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding != "same":
            raise ValueError(f"padding '{padding}': expected 'same', 'valid' or two integers")
        th, tw = dilation[0] * (kernel[0] - 1), dilation[1] * (kernel[1] - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = padding
    return ph, ph, pw, pw


def conv_output_size(
    size: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    pads: tuple[int, int, int, int],
    dilation: tuple[int, int],
) -> tuple[int, int]:
    """Output height and width of a convolution with explicit ``pads`` (top, bottom, left, right)."""
    oh = (size[0] + pads[0] + pads[1] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (size[1] + pads[2] + pads[3] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(f"input of size {size} is smaller than the kernel {kernel} (dilation {dilation})")
    return oh, ow


def conv_patches(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int] | str,
    dilation: tuple[int, int],
) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(N, C, H, W)`` → contiguous patches ``(N, OH·OW, C·kh·kw)`` and the output size ``(OH, OW)``."""
    if x.dim() != 4:
        raise ValueError(f"a convolution's input has 4 dimensions (N, C, H, W), got shape {tuple(x.shape)}")
    size = (x.shape[2], x.shape[3])
    top, bottom, left, right = pads = conv_padding(size, kernel, dilation, padding)
    oh, ow = conv_output_size(size, kernel, stride, pads, dilation)
    if top != bottom or left != right:
        x, top, left = F.pad(x, (left, right, top, bottom)), 0, 0
    u = F.unfold(x, kernel, dilation=dilation, padding=(top, left), stride=stride)  # (N, C·kh·kw, OH·OW)
    return u.transpose(1, 2).contiguous(), (oh, ow)


def patch_linear(u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Patches ``(N, L, C·kh·kw)`` times the flattened weight ``(O, C/groups·kh·kw)`` → ``(N, L, O)``; with
    ``groups`` > 1 each group's slice of the patch meets its own slice of the output channels."""
    if groups == 1:
        return F.linear(u, weight, bias)
    n, length, k = u.shape
    o = weight.shape[0]
    ug = u.reshape(n, length, groups, k // groups)
    wg = weight.reshape(groups, o // groups, k // groups)
    y = torch.einsum("nlgk,gok->nlgo", ug, wg).reshape(n, length, o)
    return y if bias is None else y + bias


def patches_to_map(y: torch.Tensor, oh: int, ow: int) -> torch.Tensor:
    """``(N, OH·OW, O)`` → the contiguous feature map ``(N, O, OH, OW)``."""
    return y.reshape(y.shape[0], oh, ow, y.shape[-1]).permute(0, 3, 1, 2).contiguous()
