"""ONNX export: every format maps to the intended ONNX path and ONNX Runtime reproduces lowbit's outputs.

Tolerances (max |ort − lowbit| / max |lowbit|), ORT sessions with ``session.qdq_matmulnbits_accuracy_level=0``
(ORT otherwise fuses int8 DequantizeLinear→MatMul into an int8-accumulating MatMulNBits):
  * weight-only formats, accuracy_level 0: ≤ 1e-5 (measured ~1e-7: float summation order only);
  * activation-quantized formats: ≤ 1e-5 as well when no code flips; we allow 2e-2 because a float-order difference
    upstream can move an activation across a rounding tie (one code step);
  * accuracy_level 4 (int8 accumulation of A) and ORT's default QDQ fusion: ≤ 3e-2.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import ModelError
from lowbit.export.onnx import export_onnx
from lowbit.recipe import Recipe

WEIGHT_ONLY_TOL = 1e-5
ACT_TOL = 2e-2
INT8_COMPUTE_TOL = 3e-2


def session(path: Path, exact: bool = True) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if exact:  # keep ORT's DQ→MatMul fusion in fp32 so the result is lowbit's to float rounding
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def rel_err(y: np.ndarray, ref: torch.Tensor) -> float:
    r = ref.detach().numpy()
    return float(np.abs(y - r).max() / np.abs(r).max())


def op_types(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def recipe(weights: str | None, acts: str | None = None, **extra) -> Recipe:
    stage = {"method": "rtn", "weights": weights, "activations": acts, "keep_first_last": False, **extra}
    return Recipe.from_dict({"stages": [stage]})


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(96, 256), nn.ReLU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 10)).eval()


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding="valid"), nn.ReLU(),
        nn.Conv2d(32, 32, 3, groups=4, padding="same"), nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
    ).eval()  # fmt: skip


CALIB = [torch.randn(32, 96) for _ in range(2)]

# weights format, activations format, expected weight path of the middle layer, tolerance
MLP_CASES = [
    ("int8", None, "QDQ int8", WEIGHT_ONLY_TOL),
    ("int8", "int8_token", "QDQ int8", ACT_TOL),
    ("int8", "int8_static", "QDQ int8", ACT_TOL),
    ("int8", {"kind": "int", "bits": 8, "symmetric": False, "granularity": "token", "dynamic": True}, "QDQ int8",
     ACT_TOL),
    ("int4_g128", None, "MatMulNBits bits=4", WEIGHT_ONLY_TOL),
    ("int4_g32", None, "MatMulNBits bits=4", WEIGHT_ONLY_TOL),
    ("int4_sym_g128", None, "MatMulNBits bits=4", WEIGHT_ONLY_TOL),
    ("int4", None, "MatMulNBits bits=4", WEIGHT_ONLY_TOL),
    ("int2_g64", None, "MatMulNBits bits=2", WEIGHT_ONLY_TOL),
    ("ternary_absmean", "int8_token", "MatMulNBits bits=2", ACT_TOL),
    ("binary", None, "MatMulNBits bits=2", WEIGHT_ONLY_TOL),
    ("binary", "binary_token", "MatMulNBits bits=2", ACT_TOL),
    ("int6", None, "QDQ int6 (int8 container)", WEIGHT_ONLY_TOL),
    ("int3_g64", None, "fp32 (dequantized)", WEIGHT_ONLY_TOL),
    ("fp4_e2m1", None, "fp32 (dequantized)", WEIGHT_ONLY_TOL),
    ("fp8_e4m3", None, "fp32 (dequantized)", WEIGHT_ONLY_TOL),
    (None, "int8_token", "fp32", ACT_TOL),
]  # fmt: skip


@pytest.mark.parametrize(("weights", "acts", "path", "tol"), MLP_CASES, ids=lambda v: str(v))
def test_mlp_formats_match_lowbit(tmp_path: Path, weights, acts, path: str, tol: float) -> None:
    q = lowbit.compress(mlp(), recipe(weights, acts), data=CALIB, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = export_onnx(q, torch.randn(2, 96), tmp_path / "m.onnx")
    assert report.paths() == {"0": path, "2": path, "4": path}
    fallback = [str(w.message) for w in caught if "dequantized fp32" in str(w.message)]
    assert bool(fallback) == path.startswith("fp32 ("), fallback
    x = torch.randn(7, 96)  # another batch size: the batch axis is dynamic
    y = session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    assert rel_err(y, q(x)) <= tol
    ops = op_types(tmp_path / "m.onnx")
    if path.startswith("MatMulNBits"):
        assert ops.count("MatMulNBits") == 3 and "MatMul" not in ops
    if path.startswith("QDQ"):
        assert ops.count("DequantizeLinear") >= 3
    if acts == "int8_static":
        assert ops.count("QuantizeLinear") == 3


def test_packed_model_exports_identically(tmp_path: Path) -> None:
    q = lowbit.compress(mlp(), recipe("int4_g32"), progress=False)
    a = export_onnx(q, torch.randn(2, 96), tmp_path / "q.onnx")
    b = export_onnx(lowbit.pack(q), torch.randn(2, 96), tmp_path / "p.onnx")
    assert a.paths() == b.paths()
    x = torch.randn(3, 96).numpy()
    ya = session(tmp_path / "q.onnx").run(None, {"input": x})[0]
    yb = session(tmp_path / "p.onnx").run(None, {"input": x})[0]
    assert np.array_equal(ya, yb)


def test_accuracy_level_4_and_default_qdq_fusion(tmp_path: Path) -> None:
    q = lowbit.compress(mlp(), recipe("int4_g32"), progress=False)
    report = export_onnx(q, torch.randn(2, 96), tmp_path / "m.onnx", accuracy_level=4)
    nodes = [n for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert report.opset == 21 and all(a.i == 4 for n in nodes for a in n.attribute if a.name == "accuracy_level")
    x = torch.randn(5, 96)
    assert rel_err(session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0], q(x)) <= INT8_COMPUTE_TOL
    q8 = lowbit.compress(mlp(), recipe("int8"), progress=False)
    export_onnx(q8, torch.randn(2, 96), tmp_path / "w8.onnx")
    y = session(tmp_path / "w8.onnx", exact=False).run(None, {"input": x.numpy()})[0]
    assert rel_err(y, q8(x)) <= INT8_COMPUTE_TOL


def test_input_scale_and_shift_are_exported(tmp_path: Path) -> None:
    q = lowbit.compress(mlp(), recipe("int4_g128", "binary_token"), progress=False)
    torch.manual_seed(1)
    q[2].set_input_scale(torch.rand(256) + 0.5)
    q[2].set_input_shift(torch.randn(256) * 0.1)
    q[0].set_input_scale(torch.rand(96) + 0.5)
    report = export_onnx(q, torch.randn(2, 96), tmp_path / "m.onnx")
    assert report.layers[1].activations.startswith("input_scale Mul, input_shift Sub, binary")
    x = torch.randn(4, 96)
    assert rel_err(session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0], q(x)) <= ACT_TOL


@pytest.mark.parametrize(
    ("weights", "acts", "conv_path", "tol"),
    [
        ("int8", None, "QDQ int8", WEIGHT_ONLY_TOL),
        ("int8", "int8_static", "QDQ int8", ACT_TOL),
        # per-token activations of a conv are per patch: patches × weight matrix (grouped: block-diagonal, fp32)
        ("int8", "int8_token", ("QDQ int8", "fp32 (dequantized)"), ACT_TOL),
        ("int4", None, "QDQ int4 (int8 container)", WEIGHT_ONLY_TOL),
        ("int4_g32", None, "fp32 (dequantized)", WEIGHT_ONLY_TOL),  # the first conv (27 columns) is one group
    ],
)
def test_conv_model(tmp_path: Path, weights: str, acts, conv_path, tol: float) -> None:
    calib = [torch.randn(16, 3, 12, 12) for _ in range(2)]
    q = lowbit.compress(convnet(), recipe(weights, acts), data=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(q, torch.randn(2, 3, 12, 12), tmp_path / "c.onnx")
    paths = [e.weights for e in report.layers if e.type == "Conv2d"]
    plain, grouped = conv_path if isinstance(conv_path, tuple) else (conv_path, conv_path)
    assert paths[1:] == [plain, grouped] and paths[0] in (plain, "QDQ int4 (int8 container)")
    x = torch.randn(5, 3, 12, 12)
    assert rel_err(session(tmp_path / "c.onnx").run(None, {"input": x.numpy()})[0], q(x)) <= tol


def test_int4_file_is_about_one_seventh_of_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(2048, 2048)).eval()
    q = lowbit.compress(big, recipe("int4_g128"), progress=False)
    r_fp = export_onnx(big, torch.randn(1, 2048), tmp_path / "fp.onnx")
    r_q = export_onnx(q, torch.randn(1, 2048), tmp_path / "q.onnx")
    ratio = r_fp.bytes / r_q.bytes  # 32 bits vs 4 + 32/128 (fp32 scale) + 4/128 (packed zero) = 4.28 bits
    assert 6.5 < ratio < 8.0, ratio
    assert r_q.bytes == (tmp_path / "q.onnx").stat().st_size


class TextModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.proj = nn.Linear(64, 128)
        self.out = nn.Linear(128, 32)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.out(torch.relu(self.proj(self.emb(input_ids))))
        m = attention_mask.unsqueeze(-1).float()
        return (h * m).sum(1) / m.sum(1)


def test_dict_inputs_have_dynamic_batch_and_sequence(tmp_path: Path) -> None:
    torch.manual_seed(0)
    q = lowbit.compress(TextModel().eval(), recipe("int4_g32", "int8_token"), progress=False)
    ex = {"input_ids": torch.randint(0, 50, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.int64)}
    export_onnx(q, ex, tmp_path / "t.onnx")
    batch = {"input_ids": torch.randint(0, 50, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.int64)}
    batch["attention_mask"][0, 7:] = 0
    y = session(tmp_path / "t.onnx").run(None, {k: v.numpy() for k, v in batch.items()})[0]
    assert rel_err(y, q(**batch)) <= ACT_TOL


def test_unsupported_layers_are_refused_by_name(tmp_path: Path) -> None:
    q = lowbit.compress(mlp(), recipe("fp8_e4m3", "fp8_token"), progress=False)
    with pytest.raises(ModelError, match=r"layer '0'.*fp8.*activations cannot be exported"):
        export_onnx(q, torch.randn(2, 96), tmp_path / "x.onnx")
    from lowbit.nn.qat import QATLinear

    m = mlp()
    m[2] = QATLinear.from_float(m[2], weight="ternary")
    with pytest.raises(ModelError, match=r"layer '2' \(QATLinear\) cannot be exported"):
        export_onnx(m, torch.randn(2, 96), tmp_path / "x.onnx")
    with pytest.raises(ModelError, match="opset"):
        export_onnx(lowbit.compress(mlp(), "w8", progress=False), torch.randn(2, 96), tmp_path / "x.onnx", opset=11)
    assert os.listdir(tmp_path) == []  # nothing written, no temp file left behind


def test_existing_file_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    export_onnx(lowbit.compress(mlp(), "w4g128", progress=False), torch.randn(2, 96), target)
    assert onnx.load(str(target)).graph.node and sorted(os.listdir(tmp_path)) == ["m.onnx"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-cnn", "digits-vit"])
@pytest.mark.parametrize("preset", ["w8a8", "w4g128", "w2g64", "ternary", "w1a1"])
def test_digits_workloads(tmp_path: Path, name: str, preset: str) -> None:
    from lowbit.zoo import get_workload

    wl = get_workload(name)
    q = lowbit.compress(wl.build(), preset, data=wl.calibration_batches(64), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(q, wl.example_batch(2), tmp_path / "m.onnx")
    x = wl.example_batch(16)
    y = session(tmp_path / "m.onnx").run(None, {"input": x.numpy()})[0]
    assert rel_err(y, q(x)) <= ACT_TOL
    assert (y.argmax(-1) == q(x).argmax(-1).numpy()).mean() >= 0.9


@pytest.mark.slow
def test_minilm_w4g128(tmp_path: Path) -> None:
    from lowbit.zoo import get_workload

    pytest.importorskip("transformers")
    wl = get_workload("minilm")
    q = lowbit.compress(wl.build(), "w4g128", progress=False)
    report = export_onnx(q, wl.example_batch(2), tmp_path / "m.onnx")
    assert sum(e.weights == "MatMulNBits bits=4" for e in report.layers) >= 30
    batch = wl.example_batch(4)
    y = session(tmp_path / "m.onnx").run(None, {k: v.numpy() for k, v in batch.items()})[0]
    assert rel_err(y, q(**batch)) <= 1e-4
