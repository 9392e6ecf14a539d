"""Save and load compressed models: safetensors weights + a JSON spec, written atomically, never unpickled.

``lowbit.save(model, dir)`` writes ``dir/model.safetensors`` (codes, scales, zero points and every other tensor)
and ``dir/lowbit.json`` (format version, recipe, each quantized layer's formats and shape, the model's source, and
the weights file's size and SHA-256). ``lowbit.load(dir)`` rebuilds the float architecture from the recorded source
(an embedded workload, a Hugging Face directory or ``module:function``) or from ``model=``, swaps in the quantized
layers and loads the tensors; a missing, truncated or altered file is refused with a `CheckpointError`.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> import lowbit
    >>> base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    >>> q = lowbit.compress(base, "w4g128")
    >>> d = tempfile.mkdtemp() + "/ckpt"
    >>> _ = lowbit.save(q, d)
    >>> q2 = lowbit.load(d, model=base)
    >>> x = torch.randn(3, 8)
    >>> torch.equal(q(x), q2(x))
    True
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.compress import quant_layers, set_submodule
from lowbit.errors import CheckpointError, LowbitError
from lowbit.formats.spec import QuantSpec
from lowbit.nn.batchnorm_fold import rebuild_folded
from lowbit.nn.fused_blocks import fuse_encoder_blocks
from lowbit.nn.hf_attention import use_lowbit_attention
from lowbit.nn.packed import PackedConv2d, PackedLinear, PackedMixin
from lowbit.nn.qlayers import QuantConv2d, QuantLayer, QuantLinear
from lowbit.recipe import Recipe
from lowbit.report.atomic import atomic_dir

#: 2: a convolution's per-token activations are quantized per patch (`lowbit.nn.patches`); version 1 quantized
#: them along the input's last dimension, so a version-1 checkpoint holding such a convolution is refused.
#: 3: ``folded_batchnorm`` lists BatchNorms folded into the convolutions before them (rebuilt on load: an older
#: lowbit would report a tensor mismatch). Checkpoints without folded pairs are still written as version 2.
FORMAT_VERSION = 3
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "lowbit.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def layer_entry(layer: QuantLayer) -> dict[str, Any]:
    """JSON description of one quantized layer (enough to rebuild it empty)."""
    entry: dict[str, Any] = {"bias": layer.bias is not None, **layer.layer_spec()}
    if isinstance(layer, PackedMixin):
        entry.update(layer.packed_spec())
    if isinstance(layer, QuantConv2d):
        entry.update(type="Conv2d", **layer.conv_args())
    else:
        assert isinstance(layer, QuantLinear)
        entry.update(type="Linear", in_features=layer.in_features, out_features=layer.out_features)
    return entry


def save(model: nn.Module, directory: str | Path, *, source: dict[str, Any] | None = None) -> Path:
    """Write a compressed model to ``directory`` atomically (a temp directory renamed into place)."""
    directory = Path(directory)
    recipe: Recipe | None = getattr(model, "lowbit_recipe", None)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    spec: dict[str, Any] = {
        "format_version": FORMAT_VERSION if getattr(model, "lowbit_folded_batchnorm", None) else 2,
        "lowbit_version": _version(),
        "source": source if source is not None else getattr(model, "lowbit_source", None),
        "recipe": recipe.to_dict() if recipe is not None else None,
        "layers": {name: layer_entry(layer) for name, layer in quant_layers(model)},
        "folded_batchnorm": dict(getattr(model, "lowbit_folded_batchnorm", {})),
        "tensors": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in state.items()
        },
    }
    with atomic_dir(directory) as tmp:
        save_file(
            state,
            str(Path(tmp) / WEIGHTS_FILE),
            metadata={"format": "pt", "lowbit_format": str(spec["format_version"])},
        )
        weights = Path(tmp) / WEIGHTS_FILE
        spec["weights"] = {"file": WEIGHTS_FILE, "bytes": weights.stat().st_size, "sha256": _sha256(weights)}
        (Path(tmp) / SPEC_FILE).write_text(json.dumps(spec, indent=1))
    return directory


def read_spec(directory: str | Path) -> dict[str, Any]:
    """Read and check ``lowbit.json`` and the weights file it describes (size and checksum)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory '{directory}' not found")
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"'{directory}' is not a lowbit checkpoint: {SPEC_FILE} is missing")
    try:
        spec = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{spec_path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}): "
            "the checkpoint is damaged, save it again"
        ) from None
    version = spec.get("format_version") if isinstance(spec, dict) else None
    if version not in (1, 2, FORMAT_VERSION):
        raise CheckpointError(
            f"{spec_path}: checkpoint format version {version!r} is not supported by this lowbit "
            f"(reads versions 1 to {FORMAT_VERSION})"
        )
    if version == 1:
        _check_version_1(spec, spec_path)
    weights = directory / spec.get("weights", {}).get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise CheckpointError(
            f"checkpoint '{directory}' has no {weights.name}: the save was interrupted or the file was removed"
        )
    expected = spec.get("weights", {})
    size = weights.stat().st_size
    if expected.get("bytes") is not None and size != expected["bytes"]:
        raise CheckpointError(
            f"{weights} is truncated or padded ({size} bytes, expected {expected['bytes']}): copy the checkpoint again"
        )
    if expected.get("sha256") and _sha256(weights) != expected["sha256"]:
        raise CheckpointError(
            f"{weights} does not match the checksum in {SPEC_FILE}: the file was modified; "
            "re-create the checkpoint with lowbit.save"
        )
    return spec


def _check_version_1(spec: dict[str, Any], spec_path: Path) -> None:
    """A version-1 checkpoint computes what it did unless it holds a convolution with per-token activations."""
    for name, entry in (spec.get("layers") or {}).items():
        act = entry.get("activations") if isinstance(entry, dict) else None
        if (
            entry.get("type") == "Conv2d"
            and isinstance(act, dict)
            and act.get("dynamic")
            and act.get("granularity") == "token"
        ):
            raise CheckpointError(
                f"{spec_path}: layer '{name}' is a convolution with per-token activations saved by an older lowbit "
                "(format 1), which quantized them along the input's last dimension; this lowbit quantizes them per "
                "patch (one scale per output position), so the layer would compute another function: compress "
                "the model again"
            )


def load(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a compressed model saved by `save`. ``model`` supplies the float architecture when no source
    was recorded (its weights are replaced by the checkpoint's)."""
    directory = Path(directory)
    spec = read_spec(directory)
    if model is not None:
        base = copy.deepcopy(model)
    elif spec.get("source"):
        from lowbit.models import build_from_source

        base = build_from_source(spec["source"])
    else:
        raise CheckpointError(
            f"checkpoint '{directory}' records no model source: pass model= (the float model "
            "it was compressed from) to lowbit.load"
        )
    base.eval()
    folded = spec.get("folded_batchnorm", {})
    if not isinstance(folded, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in folded.items()):
        raise CheckpointError(f"{SPEC_FILE}: 'folded_batchnorm' must map BatchNorm names to layer names")
    try:
        rebuild_folded(base, folded)
    except (AttributeError, TypeError) as exc:
        raise CheckpointError(f"checkpoint's folded BatchNorm layers do not fit the model ({exc})") from None
    if folded:
        base.lowbit_folded_batchnorm = dict(folded)  # type: ignore[assignment]
    for name, entry in spec.get("layers", {}).items():
        try:
            set_submodule(base, name, _empty_layer(entry))
        except (AttributeError, KeyError, TypeError, ValueError, LowbitError) as exc:
            raise CheckpointError(f"checkpoint layer '{name}' does not fit the model ({exc})") from None
    try:
        state = load_file(str(directory / spec["weights"]["file"]))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {directory / WEIGHTS_FILE}: {exc}") from None
    for key, meta in spec.get("tensors", {}).items():
        t = state.get(key)
        if t is None or list(t.shape) != meta["shape"]:
            raise CheckpointError(f"tensor '{key}' is missing or has the wrong shape in {WEIGHTS_FILE}")
    result = base.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise CheckpointError(f"checkpoint and model disagree on tensor '{bad}': was it saved from another model?")
    if spec.get("recipe"):
        base.lowbit_recipe = Recipe.from_dict(spec["recipe"])  # type: ignore[assignment]
    if spec.get("source"):
        base.lowbit_source = spec["source"]  # type: ignore[assignment]
    if any(entry.get("packed") for entry in spec.get("layers", {}).values()):
        base.requires_grad_(False)  # a packed model is an inference artifact (see lowbit.pack)
        use_lowbit_attention(base)  # as lowbit.pack's defaults
        fuse_encoder_blocks(base.eval())
    return base


def _empty_layer(entry: dict[str, Any]) -> QuantLayer:
    weights = QuantSpec.from_dict(entry["weights"]) if entry.get("weights") else None
    acts = QuantSpec.from_dict(entry["activations"]) if entry.get("activations") else None
    act_opts = {"calibrator": entry.get("calibrator") or "percentile", "percentile": entry.get("percentile") or 99.99}
    packed = bool(entry.get("packed"))
    conv_cls, linear_cls = (PackedConv2d, PackedLinear) if packed else (QuantConv2d, QuantLinear)
    if packed:
        act_opts["zero_format"] = entry.get("zero_format")
    if entry["type"] == "Conv2d":
        padding = entry["padding"] if isinstance(entry["padding"], str) else tuple(entry["padding"])
        layer: QuantLayer = conv_cls(
            entry["in_channels"],
            entry["out_channels"],
            tuple(entry["kernel_size"]),
            tuple(entry["stride"]),
            padding,
            tuple(entry["dilation"]),
            entry["groups"],
            entry["bias"],
            weights,
            acts,
            **act_opts,
        )
    else:
        layer = linear_cls(entry["in_features"], entry["out_features"], entry["bias"], weights, acts, **act_opts)
    if entry.get("input_scale"):
        layer.set_input_scale(torch.ones(int(entry["input_scale"])))
    if entry.get("input_shift"):
        layer.set_input_shift(torch.zeros(int(entry["input_shift"])))
    return layer


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lowbit")
    except Exception:  # noqa: BLE001
        return "dev"


__all__ = ["FORMAT_VERSION", "load", "read_spec", "save"]
