"""save/load round trip and refusal of damaged checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CheckpointError
from lowbit.io import load, save
from lowbit.recipe import Recipe


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 32),
        nn.ReLU(),
        nn.Linear(32, 3),
    ).eval()


PRESETS = ["w8a8", "w8a8-static", "w4g128", "w2g64", "fp8", "fp4", "ternary", "binary", "w1a1"]


@pytest.mark.parametrize("preset", PRESETS)
def test_roundtrip_is_exact(tmp_path, preset: str) -> None:
    base = _model()
    data = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    q = lowbit.compress(base, preset, data=data, progress=False)
    save(q, tmp_path / "ck")
    q2 = load(tmp_path / "ck", model=base)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(q(x), q2(x))
    assert q2.lowbit_recipe.name == preset
    assert not list(tmp_path.glob("*.tmp*"))


def _saved(tmp_path) -> tuple[nn.Module, object]:
    base = _model()
    save(lowbit.compress(base, "w4g128", progress=False), tmp_path / "ck")
    return base, tmp_path / "ck"


def test_truncated_checkpoint_is_refused(tmp_path) -> None:
    base, ck = _saved(tmp_path)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load(ck, model=base)


def test_tampered_checkpoint_is_refused(tmp_path) -> None:
    base, ck = _saved(tmp_path)
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load(ck, model=base)


def test_missing_and_bad_spec(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nope")
    base, ck = _saved(tmp_path)
    (ck / "lowbit.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(ck, model=base)


def test_checkpoints_without_folded_batchnorms_stay_format_2(tmp_path) -> None:
    """Format 3 only adds the folded BatchNorm pairs: without any, a checkpoint is written as version 2, which the
    previous lowbit reads too."""
    base, ck = _saved(tmp_path)
    spec = json.loads((ck / "lowbit.json").read_text())
    assert spec["format_version"] == 2 and spec["folded_batchnorm"] == {}
    assert load(ck, model=base) is not None


def test_future_version_and_no_source(tmp_path) -> None:
    base, ck = _saved(tmp_path)
    with pytest.raises(CheckpointError, match="records no model source"):
        load(ck)
    spec = json.loads((ck / "lowbit.json").read_text())
    spec["format_version"] = 99
    (ck / "lowbit.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="version 99"):
        load(ck, model=base)


@pytest.mark.parametrize(("acts", "refused"), [("int8_token", True), (None, False)])
def test_format_1_checkpoints_load_unless_a_conv_has_per_token_activations(tmp_path, acts, refused: bool) -> None:
    """Format 1 quantized a conv's per-token activations along the image width; format 2 per patch. A format-1
    checkpoint whose convolutions do not quantize activations per token still means the same and loads."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    recipe = Recipe.from_dict({"stages": [{"method": "rtn", "weights": "int8", "activations": acts,
                                           "keep_first_last": False}]})  # fmt: skip
    q = lowbit.compress(base, recipe, progress=False)
    save(q, tmp_path / "ck")
    spec = json.loads((tmp_path / "ck" / "lowbit.json").read_text())
    spec["format_version"] = 1
    (tmp_path / "ck" / "lowbit.json").write_text(json.dumps(spec))
    if refused:
        with pytest.raises(CheckpointError, match="layer '0' is a convolution with per-token activations"):
            load(tmp_path / "ck", model=base)
    else:
        x = torch.randn(2, 1, 8, 8)
        with torch.no_grad():
            assert torch.equal(load(tmp_path / "ck", model=base)(x), q(x))


def test_save_over_existing_keeps_a_complete_checkpoint(tmp_path) -> None:
    base, ck = _saved(tmp_path)
    save(lowbit.compress(base, "w8", progress=False), ck)
    assert load(ck, model=base).lowbit_recipe.name == "w8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
