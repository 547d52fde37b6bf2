"""Feed-forward block."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MLP"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def _activation(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    # A silently substituted activation would load checkpoints without error and give wrong outputs.
    raise ValueError(f"unknown MLP activation '{name}'; known: gelu, gelu_tanh, quick_gelu")


class MLP(nn.Module):
    """fc1 -> activation -> fc2; dropout after the activation and after fc2 (as in ViT and BERT)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0, activation: str = "gelu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = _activation(activation)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
