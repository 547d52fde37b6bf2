"""Task heads on top of the fused representation: ITM classifier, the BERT-style MLM head, the VQA classifier."""

from __future__ import annotations

from torch import Tensor, nn

from vlp.layers import init_transformer_weights

__all__ = ["ITMHead", "MLMHead", "VQAHead"]


class ITMHead(nn.Module):
    """Binary match classifier on the fusion's pooled output; column 1 = match."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_dim, 2)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(pooled)


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then a decoder tied to the input embeddings."""

    def __init__(self, dim: int, vocab_size: int, tied_embedding: nn.Embedding | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.decoder = nn.Linear(dim, vocab_size)
        if tied_embedding is not None and tied_embedding.weight.shape == self.decoder.weight.shape:
            self.decoder.weight = tied_embedding.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.decoder(self.norm(self.act(self.dense(tokens))))


class VQAHead(nn.Module):
    """ViLT/METER's VQA classifier: Linear(in, m*in), LayerNorm, GELU, Linear(m*in, num_answers)."""

    def __init__(self, in_dim: int, num_answers: int, hidden_mult: int = 2) -> None:
        super().__init__()
        hidden = hidden_mult * in_dim
        self.classifier = nn.Sequential(nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                        nn.Linear(hidden, num_answers))
        self.apply(init_transformer_weights)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.classifier(pooled)  # type: ignore[no-any-return]
