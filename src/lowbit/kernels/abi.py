"""The C library's interface as Python sees it: the ``lb_layer`` struct (`LayerDesc`), its enums, the ABI version
the loader checks, and the names of the instruction sets a build reports (``lb_isa``).

Kept apart from `lowbit.kernels.native` (which finds, builds and binds the library) so that the layout of the
shared struct sits in one small file next to its C definition's comments.

Example:
    >>> from lowbit.kernels.abi import WKINDS, LayerDesc
    >>> LayerDesc(wkind=WKINDS["w8"]).wkind
    1
"""

from __future__ import annotations

import ctypes

#: lb_isa() → name: the widest instruction set the loaded build uses.
ISA_NAMES = {3: "avx512vnni", 2: "avx2", 0: "scalar"}

ABI_VERSION = 9  # lb_abi_version() of the source this module binds


class LayerDesc(ctypes.Structure):
    """The C ``lb_layer``: one packed layer as `lb_linear` runs it (weights, scales, activation quantizer)."""

    _fields_ = [
        ("wkind", ctypes.c_int32),
        ("akind", ctypes.c_int32),
        ("N", ctypes.c_int64),
        ("K", ctypes.c_int64),
        ("ld", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("s", ctypes.c_void_p),
        ("sz", ctypes.c_void_p),
        ("bits", ctypes.c_int32),
        ("group", ctypes.c_int32),
        ("qmax", ctypes.c_float),
        ("min_scale", ctypes.c_float),
        ("max_scale", ctypes.c_float),
        ("sign_scale", ctypes.c_int32),
        ("wp", ctypes.c_void_p),
        ("sp", ctypes.c_void_p),
        ("pld", ctypes.c_int64),
        ("ws", ctypes.c_void_p),
        ("fp_man", ctypes.c_int32),  # low-bit float activations ("fp"): mantissa bits, normal exponent range
        ("fp_emin", ctypes.c_int32),
        ("fp_emax", ctypes.c_int32),
        ("xs", ctypes.c_void_p),  # per-input-channel scale applied before activation quantization, or NULL
        ("sa", ctypes.c_void_p),  # static int8 activations ("int8s"): the quantizer's scale, zero point (or NULL)
        ("za", ctypes.c_void_p),
        ("qmin", ctypes.c_float),  # its lowest code
        ("wsum", ctypes.c_void_p),  # (N,) sum_k W[n, k]: the zero point's term is sa * (qmin + 128 - za) * wsum
    ]


WKINDS = {"w8": 1, "wn": 2, "ternary": 3, "binary_blocked": 4, "binary_inter": 5, "fp8": 6}
AKINDS = {"f32": 0, "int8": 1, "sign": 2, "fp": 3, "int8s": 4}


class BlockDesc(ctypes.Structure):
    """The C ``lb_block`` (lowbit_block.cpp): one encoder block's four ``lb_layer`` pointers, biases, LayerNorm
    parameters and attention constants, as ``lb_encoder_block`` runs it."""

    _fields_ = [
        ("qkv", ctypes.c_void_p),
        ("o", ctypes.c_void_p),
        ("fc1", ctypes.c_void_p),
        ("fc2", ctypes.c_void_p),
        ("qkv_b", ctypes.c_void_p),
        ("o_b", ctypes.c_void_p),
        ("fc1_b", ctypes.c_void_p),
        ("fc2_b", ctypes.c_void_p),
        ("ln1_w", ctypes.c_void_p),
        ("ln1_b", ctypes.c_void_p),
        ("ln2_w", ctypes.c_void_p),
        ("ln2_b", ctypes.c_void_p),
        ("eps1", ctypes.c_float),
        ("eps2", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("heads", ctypes.c_int32),
        ("act", ctypes.c_int32),
        ("pre_norm", ctypes.c_int32),
        ("ffn", ctypes.c_int32),
        ("q", ctypes.c_void_p),  # qkv None: query, key and value as three layers
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("q_b", ctypes.c_void_p),
        ("k_b", ctypes.c_void_p),
        ("v_b", ctypes.c_void_p),
    ]
