"""A BERT-style model in one C call (`lowbit.nn.fused_model`): the embedding pass and the stacked encoder give the
model's own output (to float rounding), and every call outside the plain case takes the model's own forward."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.kernels import native
from lowbit.kernels.dispatch import use_mode
from lowbit.nn import fused_blocks as fb
from lowbit.nn import fused_model as fm
from tests.nn.test_fused_native import W4G32, inputs, saved_and_loaded, tiny

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def packed(model: torch.nn.Module | None = None) -> torch.nn.Module:
    """Weight-only 4-bit layers with fp32 activations: no activation rounding amplifies the embedding pass's float
    rounding, so outputs compare closely."""
    return lowbit.pack(lowbit.compress(tiny("bert") if model is None else model, W4G32, progress=False))


def embed_calls(model: torch.nn.Module, **kw) -> tuple[int, object]:
    """(calls of the whole model in C — ``lb_bert_encoder`` —, output) of a call in ``native`` mode after two warm-up
    calls."""
    lib = native._need()
    real = lib.lb_bert_encoder
    count = [0]

    def counting(*args):
        count[0] += 1
        return real(*args)

    with use_mode("native"), torch.no_grad():
        model(**inputs("bert"))
        model(**inputs("bert"))
        lib.lb_bert_encoder = counting
        try:
            out = model(**inputs("bert"), **kw)
        finally:
            lib.lb_bert_encoder = real
    return count[0], out


def own_output(model: torch.nn.Module, **kw) -> object:
    """The model's own forward (its encoder still stacked)."""
    fused = model.__dict__["forward"]
    with use_mode("native"), torch.no_grad():
        return fused.original(**inputs("bert"), **kw)


@pytest.mark.parametrize("pooler", [False, True])
def test_fused_bert_equals_its_own_forward(pooler):
    torch.manual_seed(0)
    cfg = tiny("bert").config
    model = packed(transformers.BertModel(cfg, add_pooling_layer=pooler).eval())
    assert [name for name, _ in fm.fused_models(model)] == [""]
    calls, out = embed_calls(model)
    ref = own_output(model)
    assert calls == 1 and type(out) is type(ref)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    if pooler:
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)
    else:
        assert out.pooler_output is None


def test_without_token_type_ids_type_zero_is_used():
    model = packed()
    batch = {k: v for k, v in inputs("bert").items() if k != "token_type_ids"}
    with use_mode("native"), torch.no_grad():
        for _ in range(3):
            out = model(**batch)
        ref = model.__dict__["forward"].original(**batch)
        typed = model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"]))
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(typed.last_hidden_state, out.last_hidden_state, rtol=0, atol=0)


def test_other_calls_take_the_models_own_forward():
    model = packed()
    for skipped in (model.embeddings, model.embeddings.LayerNorm, model.encoder):
        hook = skipped.register_forward_hook(lambda mod, args, output: None)
        assert embed_calls(model)[0] == 0
        hook.remove()
        assert embed_calls(model)[0] == 1
    with torch.no_grad():
        out = model(**inputs("bert"), inputs_embeds=None, position_ids=torch.arange(12)[None])
    assert out.last_hidden_state.shape == (3, 12, 64)
    calls, out = embed_calls(model, output_hidden_states=True)
    assert calls == 0 and len(out.hidden_states) == 3
    model.config.output_hidden_states = True  # asked for in the config: the same
    calls, out = embed_calls(model)
    assert calls == 0 and len(out.hidden_states) == 3
    # transformers leaves its output-capturing hooks on the blocks: later plain calls take the model's own forward too
    model.config.output_hidden_states = False
    assert embed_calls(model)[0] == 0


def test_bad_token_ids_get_the_models_own_error():
    model = packed()
    embed_calls(model)
    bad = inputs("bert")
    bad["input_ids"] = bad["input_ids"] + 1000  # past the vocabulary of 50
    with pytest.raises(IndexError), torch.no_grad():
        model(**bad)


def test_a_changed_embedding_module_is_checked_again():
    model = packed()
    embed_calls(model)
    with torch.no_grad():
        model.embeddings.token_type_ids.fill_(1)  # transformers' default type ids, now type 1: not what C assumes
    calls, out = embed_calls(model)
    assert calls == 0
    with torch.no_grad():
        model.embeddings.token_type_ids.zero_()
        model.embeddings.word_embeddings.weight.mul_(2)  # in place: read by the pass as it is
    calls, out = embed_calls(model)
    assert calls == 1
    torch.testing.assert_close(out.last_hidden_state, own_output(model).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_roberta_positions_are_not_berts_so_it_keeps_its_forward():
    """RoBERTa counts positions from its padding index: the probe sees the difference and leaves the model alone (its
    encoder still runs stacked)."""
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40, attn_implementation="sdpa",
    )  # fmt: skip
    model = packed(transformers.RobertaModel(cfg, add_pooling_layer=False).eval())
    assert fm.fused_models(model) == []
    assert len(fb.fused_blocks(model)) == 2


def test_unfuse_and_copy():
    model = packed()
    twin = copy.deepcopy(model)
    calls, out = embed_calls(twin)
    assert calls == 1 and len(fm.fused_models(twin)) == 1
    torch.testing.assert_close(out.last_hidden_state, embed_calls(model)[1].last_hidden_state, rtol=0, atol=0)
    fb.unfuse_encoder_blocks(model)
    assert fm.fused_models(model) == [] and embed_calls(model)[0] == 0


def test_a_used_fused_model_pickles():
    model = packed()
    _, ref = embed_calls(model)
    twin = saved_and_loaded(model)
    calls, out = embed_calls(twin)
    assert calls == 1 and len(fm.fused_models(twin)) == 1
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=0)
