"""An encoder's fused blocks in one C call (``lb_encoder_stack``): taken once every block is described, left for the
blocks' own calls whenever anything the descriptions were built from changed, or anything else must see the blocks."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit.kernels import native
from lowbit.kernels.dispatch import use_mode
from lowbit.nn import fused_blocks as fb
from lowbit.nn import fused_model as fm
from lowbit.nn import fused_stack as fs
from tests.nn.test_fused_native import counted_c_calls, inputs, python_path_only, run, saved_and_loaded, tiny

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels unavailable")


def packed_bert() -> torch.nn.Module:
    """A packed BERT whose encoder runs stacked, with transformers' own embeddings (so both paths compared here get
    the same input; the fused embeddings: test_fused_model)."""
    model = lowbit.pack(lowbit.compress(tiny("bert"), "w8a8", progress=False))
    fm.unfuse_encoder_models(model)
    return model


def stack_calls(model: torch.nn.Module, warm: int = 1, **kw) -> tuple[int, torch.Tensor]:
    """(one-call stack runs, output) of a run in ``native`` mode after ``warm`` runs (new layers: the first prepares
    their kernels, the second describes the blocks; the probe prepared those of `lowbit.pack`'s)."""
    with use_mode("native"), counted_c_calls() as calls:
        for _ in range(warm):
            run(model, "bert")
        calls.update(dict.fromkeys(calls, 0))
        with torch.no_grad():
            out = model(**inputs("bert"), **kw).last_hidden_state
    return calls["lb_encoder_stack"], out


def python_output(model: torch.nn.Module) -> torch.Tensor:
    with use_mode("native"), python_path_only():
        return run(model, "bert")


def test_packed_bert_encoder_is_stacked_and_unfusing_undoes_it():
    model = packed_bert()
    assert [name for name, _ in fs.stacked_encoders(model)] == ["encoder"]
    assert stack_calls(model)[0] == 1
    fb.unfuse_encoder_blocks(model)
    assert fs.stacked_encoders(model) == [] and fb.fused_blocks(model) == []


def test_fp32_encoders_are_not_stacked():
    """Without packed layers there is no C description to chain: the encoder keeps its forward."""
    model = tiny("bert")
    assert fb.fuse_encoder_blocks(model) == 2
    assert fs.stacked_encoders(model) == []


def test_a_hook_on_a_block_sends_the_call_to_the_blocks():
    model = packed_bert()
    seen = []
    model.encoder.layer[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    calls, out = stack_calls(model)
    assert calls == 0 and seen  # the hook ran, on the blocks' own calls
    torch.testing.assert_close(out, python_output(model), rtol=0, atol=0)


def test_a_global_hook_sends_the_call_to_the_blocks():
    model = packed_bert()
    seen = []
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, args, out: seen.append(type(mod).__name__))
    try:
        calls, _ = stack_calls(model)
    finally:
        h.remove()
    assert calls == 0 and "LayerNorm" in seen  # every submodule was called
    assert stack_calls(model)[0] == 1


def test_a_swapped_layer_is_described_again_before_the_stack_runs():
    model = packed_bert()
    assert stack_calls(model)[0] == 1
    block = model.encoder.layer[0]
    block.intermediate.dense = copy.deepcopy(block.intermediate.dense)  # new layer: its kernels prepared anew
    with use_mode("native"), counted_c_calls() as calls:
        out = run(model, "bert")
    assert calls["lb_encoder_stack"] == 0
    torch.testing.assert_close(out, python_output(model), rtol=0, atol=0)
    assert stack_calls(model)[0] == 1


def test_an_in_place_change_to_a_concatenated_layer_is_seen():
    """Query, key and value run as one concatenated copy: changing the key's bias in place rebuilds it."""
    model = packed_bert()
    before = stack_calls(model)[1]
    with torch.no_grad():
        model.encoder.layer[1].attention.self.key.bias.add_(0.5)
        model.encoder.layer[1].attention.self.value.bias.add_(0.5)
    calls, after = stack_calls(model, warm=2)  # the new concatenated layer is prepared, then described
    assert calls == 1 and not torch.equal(after, before)
    torch.testing.assert_close(after, python_output(model), rtol=0, atol=0)


def test_training_mode_and_extra_outputs_take_the_encoders_own_forward():
    model = packed_bert()
    ref = stack_calls(model)[1]
    calls, out = stack_calls(model, output_attentions=True)
    assert calls == 0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # (transformers' eager attention, for the weights)
    model.train()
    with use_mode("native"), counted_c_calls() as counts, torch.no_grad():
        model(**inputs("bert"))
    assert counts == {"lb_encoder_block": 0, "lb_encoder_stack": 0}


def test_a_copied_model_describes_its_own_layers():
    model = packed_bert()
    ref = stack_calls(model)[1]
    twin = copy.deepcopy(model)
    assert len(fs.stacked_encoders(twin)) == 1
    calls, out = stack_calls(twin, warm=2)
    assert calls == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    del model  # the copy holds nothing of the original's kernels
    torch.testing.assert_close(stack_calls(twin)[1], ref, rtol=0, atol=0)


def _other(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "distilbert":
        cfg = transformers.DistilBertConfig(
            vocab_size=50, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=32
        )
        cfg._attn_implementation = "sdpa"
        return transformers.DistilBertModel(cfg).eval()
    cfg = transformers.RobertaConfig(
        vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=40, attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.RobertaModel(cfg, add_pooling_layer=False).eval()


@pytest.mark.parametrize("kind", ["distilbert", "roberta"])
def test_distilbert_and_roberta_encoders_run_stacked(kind):
    model = lowbit.pack(lowbit.compress(_other(kind), "w8a8", progress=False))
    assert [name for name, _ in fs.stacked_encoders(model)] == ["transformer" if kind == "distilbert" else "encoder"]
    batch = inputs("bert")  # token ids below 50, the second sequence padded
    with use_mode("native"), torch.no_grad():
        with python_path_only():
            python = model(**batch).last_hidden_state
        model(**batch)
        with counted_c_calls() as calls:
            fast = model(**batch).last_hidden_state
    assert calls["lb_encoder_stack"] == 1
    torch.testing.assert_close(fast, python, rtol=0, atol=0)


def test_concurrent_calls_give_the_sequential_output():
    """Python threads calling one model at once (the C calls release the GIL) get what one thread gets."""
    from concurrent.futures import ThreadPoolExecutor

    model = packed_bert()
    ref = stack_calls(model)[1]

    def call(i: int) -> torch.Tensor:
        with use_mode("native"), torch.no_grad():
            return model(**inputs("bert")).last_hidden_state

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(call, range(16)))
    assert all(torch.equal(o, ref) for o in outs)


def test_a_used_stacked_model_pickles_and_runs_stacked():
    """``torch.save(model)`` of a model that has run its one-call paths: nothing of them is pickled but the probe's
    verdicts (the output class), and the loaded copy runs stacked again."""
    model = packed_bert()
    _, ref = stack_calls(model)
    twin = saved_and_loaded(model)
    assert len(fs.stacked_encoders(twin)) == 1
    calls, out = stack_calls(twin, warm=2)
    assert calls == 1 and torch.equal(out, ref)
