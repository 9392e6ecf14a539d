"""Quality metrics as pure functions: accuracy, agreement, retrieval recall@k, cosine, perplexity.

Example:
    >>> import torch
    >>> from lowbit.measure.quality import accuracy, recall_at_k, perplexity
    >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    >>> recall_at_k(torch.eye(3), torch.eye(3), 1)
    1.0
    >>> round(perplexity(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long)), 4)
    7.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose argmax equals the label."""
    return float((logits.argmax(-1) == labels).float().mean())


def agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of rows where two models predict the same class."""
    return float((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean())


def recall_at_k(query: torch.Tensor, docs: torch.Tensor, k: int) -> float:
    """Fraction of queries whose own document (same index) is among the k most cosine-similar documents."""
    sims = F.normalize(query.float(), dim=-1) @ F.normalize(docs.float(), dim=-1).T
    topk = sims.topk(min(k, docs.shape[0]), dim=-1).indices
    return float((topk == torch.arange(query.shape[0]).unsqueeze(1)).any(dim=1).float().mean())


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity."""
    return float(F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=-1).mean())


def perplexity(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> float:
    """``exp`` of the mean token cross-entropy."""
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index)
    return float(torch.exp(loss))
