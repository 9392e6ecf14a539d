"""The MiniLM workload's sentence encoder: mean pooling over unmasked tokens, then L2 normalisation."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.zoo.minilm import SentenceEncoder


class _Hidden(nn.Module):
    """Stands in for a transformers encoder: returns fixed hidden states."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> types.SimpleNamespace:
        return types.SimpleNamespace(last_hidden_state=self.hidden)


def test_pooling_is_the_normalised_mean_of_unmasked_tokens():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 16, generator=g) * 5
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5])
    got = SentenceEncoder(_Hidden(hidden))(torch.zeros(3, 6, dtype=torch.long), mask)
    m = mask.unsqueeze(-1).float()
    want = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[2], F.normalize(hidden[2, 0], dim=-1))  # one token: its own direction
