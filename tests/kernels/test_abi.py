"""The Python view of the C interface (`lowbit.kernels.abi`) agrees with the loaded library."""

import pytest

from lowbit.kernels import abi, native


@pytest.mark.skipif(not native.available(), reason="no native library on this machine")
def test_layer_struct_enums_and_version_match_the_library():
    lib = native._need()
    assert lib.lb_abi_version() == abi.ABI_VERSION
    assert lib.lb_layer_size() == ctypes_size()
    assert abi.ISA_NAMES[lib.lb_isa()] == native.build_info()["isa"]
    # panel row counts exist exactly for the kinds with panels (lb_panel_rows takes the WKINDS numbers); W1A1 has
    # them only where the AMX tiles run them
    blocked = lib.lb_panel_rows(abi.WKINDS["binary_blocked"])
    assert blocked == (32 if native.amx() else 0) and lib.lb_panel_rows(abi.WKINDS["w8"]) >= 1


def ctypes_size() -> int:
    import ctypes

    return ctypes.sizeof(abi.LayerDesc)
