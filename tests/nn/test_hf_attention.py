"""transformers models on lowbit's attention kernel: same outputs as their SDPA attention, padding included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels import native
from lowbit.nn.hf_attention import NAME, use_lowbit_attention

transformers = pytest.importorskip("transformers")
needs_native = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def tiny_bert(**overrides) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        attn_implementation="sdpa",
        **overrides,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False).eval()


def padded_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0  # padding: the kernel must see SDPA's mask
    mask[2, 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@needs_native
def test_same_hidden_states_as_sdpa_with_padding():
    model = tiny_bert()
    batch = padded_batch()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        assert use_lowbit_attention(model) == 1
        assert model.config._attn_implementation == NAME
        out = model(**batch).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out[1, :7] - ref[1, :7]).abs().max() < 1e-5  # not a coincidence of an ignored mask
    unpadded = {k: v[1:2, :7] for k, v in batch.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**unpadded).last_hidden_state[0], out[1, :7], atol=1e-5, rtol=1e-5)


@needs_native
def test_decoder_with_an_implicit_causal_mask_keeps_its_meaning():
    """A causal BERT decoder without a mask: the call goes to transformers' SDPA path (same outputs)."""
    model = tiny_bert(is_decoder=True)
    ids = torch.randint(1, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        use_lowbit_attention(model)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref, atol=1e-5, rtol=1e-5)


def test_models_without_sdpa_attention_are_left_alone():
    assert use_lowbit_attention(nn.Sequential(nn.Linear(4, 4))) == 0
    eager = tiny_bert()
    eager.set_attn_implementation("eager")
    assert use_lowbit_attention(eager) == 0 and eager.config._attn_implementation == "eager"


@needs_native
def test_pack_switches_attention_unless_asked_to_keep_it(tmp_path):
    model = tiny_bert()
    q = lowbit.compress(model, "w8a8", progress=False)
    assert lowbit.pack(q).config._attn_implementation == NAME
    assert lowbit.pack(q, attention="keep").config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "sdpa"  # pack works on a copy
    with pytest.raises(ValueError, match="attention must be one of"):
        lowbit.pack(q, attention="flash")
    packed = lowbit.pack(q)
    lowbit.save(packed, tmp_path / "ckpt")
    loaded = lowbit.load(tmp_path / "ckpt", tiny_bert())
    assert loaded.config._attn_implementation == NAME
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).last_hidden_state, packed(**batch).last_hidden_state)
