"""The command line: one-line errors with a non-zero exit and no partial output; end-to-end compress/inspect/eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowbit.cli import main


def _run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str, needle: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    assert needle in lines[0], err
    assert "Traceback" not in err


def test_help(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "compress", "inspect", "eval", "presets"):
        assert cmd in out


def test_missing_model(capsys, tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "compress", "no/such/model", "--recipe", "w8a8", "--out", str(tmp_path / "o"))
    assert rc == 2
    _one_line_error(err, "not found")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("stages: [{method: rtn, wieghts: int8}]", "did you mean 'weights'"),
        ("stages: [{method: rtn, weights: {kind: int, bits: 0}}]", "bits=0"),
        ("stages: [{method: rtn, weights: {kind: int, bits: 9}}]", "bits=9"),
        ("stages: [{method: rtn, weights: int4, targets: ['nosuchlayer']}]", "matches no layer"),
    ],
)
def test_bad_recipes(capsys, tmp_path: Path, yaml_text: str, needle: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml_text)
    rc, _, err = _run(capsys, "compress", "digits-cnn", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert rc == 2
    _one_line_error(err, needle)
    assert not (tmp_path / "o").exists()


def test_unknown_preset(capsys, tmp_path: Path) -> None:
    rc, _, err = _run(capsys, "compress", "digits-cnn", "--recipe", "w4g12", "--out", str(tmp_path / "o"))
    assert rc == 2
    _one_line_error(err, "did you mean 'w4g128'")


@pytest.mark.usefixtures("auto_mode")
@pytest.mark.slow
def test_inspect_shows_per_patch_convolutions_on_their_kernel(capsys) -> None:
    rc, text, _ = _run(capsys, "inspect", "digits-cnn", "--recipe", "w8a8", "--packed")
    conv_row = next(line for line in text.splitlines() if "features.3" in line)
    assert rc == 0 and "int8 sym per-patch dynamic" in conv_row and "w8a8" in conv_row.split("│")[8]
    # 64 patches per image: where the kernel was chosen it ran its many-row layout; the 1-row head only where the
    # panels serve every row count (AVX-512 VNNI builds: W8A8 keeps no other layout)
    from lowbit.kernels.routes import panel_rows

    kernel, chosen = conv_row.split("│")[8:10]
    assert ("(panels)" in kernel) == (chosen.strip() == "w8a8")
    head_row = next(line for line in text.splitlines() if "classifier.4" in line)
    head_kernel, head_chosen = head_row.split("│")[8:10]
    assert ("(panels)" in head_kernel) == (panel_rows("w8") == 1 and head_chosen.strip() == "w8a8")


@pytest.mark.slow
def test_compress_inspect_eval_and_damaged_checkpoint(capsys, tmp_path: Path) -> None:
    out = tmp_path / "cnn-w4"
    rc, text, _ = _run(capsys, "compress", "digits-cnn", "--recipe", "w4g128-gptq", "--out", str(out))
    assert rc == 0 and "layers quantized" in text
    assert sorted(p.name for p in out.iterdir()) == ["lowbit.json", "model.safetensors"]
    rc, text, _ = _run(capsys, "inspect", str(out))
    assert rc == 0 and "int4 asym g128" in text
    rc, text, _ = _run(capsys, "inspect", str(out), "--packed", "--batch-size", "4")
    assert rc == 0 and "chosen" in text and "PackedConv2d" in text
    conv_row = next(line for line in text.splitlines() if "features.3" in line)
    assert "reference" in conv_row and conv_row.rstrip(" │").endswith("×")  # a conv is timed against fp32 too
    assert "Slower than fp32" in text or "No packed layer is slower than fp32" in text
    onnx_file = tmp_path / "cnn.onnx"
    rc, text, _ = _run(capsys, "export", str(out), "--onnx", str(onnx_file))
    assert rc == 0 and "MatMulNBits bits=4" in text and onnx_file.stat().st_size > 0
    rc, _, err = _run(capsys, "export", str(out), "--recipe", "w8", "--onnx", str(onnx_file))
    assert rc == 2
    _one_line_error(err, "already a compressed checkpoint")
    rc, text, _ = _run(capsys, "eval", str(out), "--json")
    row = json.loads(text.strip().splitlines()[-1])
    assert rc == 0 and row["quality"]["accuracy"] > 0.95 and row["bits_per_weight"] < 8
    rc, text, _ = _run(capsys, "eval", str(out), "--json", "--compile")
    compiled = json.loads(text.strip().splitlines()[-1])
    assert rc == 0 and compiled["latency_kind"] == "packed+compile" and compiled["latency_ms"] > 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    rc, _, err = _run(capsys, "eval", str(out))
    assert rc == 2
    _one_line_error(err, "truncated")


def test_presets_lists_methods(capsys) -> None:
    rc, out, _ = _run(capsys, "presets")
    assert rc == 0 and "gptq" in out and "w4g128" in out
