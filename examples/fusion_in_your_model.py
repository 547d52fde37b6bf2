"""vlp's fusion blocks inside your own PyTorch model: no vlp config, registry or tokenizer.

A toy captioned-image classifier answers "does the caption name the image's colour?". It brings its own
image encoder (a patch convolution), its own text encoder (an embedding table) and its own head; only the
fusion block comes from vlp. The script trains it for a few steps on random data, then checks the
properties that matter when you embed a fusion block: padding invariance, cached image keys/values
(one-way form), attention maps, and swapping the block type (``out_dim`` sizes the head).

Run: python examples/fusion_in_your_model.py   (CPU, a few seconds)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlp.fusion import DualStreamFusion, SingleStreamFusion

DIM, HEADS, IMAGE, PATCH = 64, 4, 16, 4
COLORS = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1]])
PAD, CLS, FIRST_COLOR_TOKEN, VOCAB = 0, 1, 2, 20  # tokens 2..5 are colour words, 6..19 filler words


class ColorCaptionClassifier(nn.Module):
    """Own encoders + any vlp fusion block + a head sized by ``fusion.out_dim``."""

    def __init__(self, fusion: SingleStreamFusion | DualStreamFusion) -> None:
        super().__init__()
        num_patches = (IMAGE // PATCH) ** 2
        self.patchify = nn.Conv2d(3, DIM, kernel_size=PATCH, stride=PATCH)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, DIM))
        self.image_pos = nn.Parameter(0.02 * torch.randn(1, num_patches + 1, DIM))
        self.words = nn.Embedding(VOCAB, DIM)
        self.text_pos = nn.Parameter(0.02 * torch.randn(1, 16, DIM))
        self.fusion = fusion
        self.head = nn.Linear(fusion.out_dim, 2)  # out_dim: D for ViLT/ALBEF pooling, 2D for METER

    def encode_image(self, images: Tensor) -> Tensor:
        patches = rearrange(self.patchify(images), "b d h w -> b (h w) d")
        cls = self.image_cls.expand(len(images), -1, -1)
        return torch.cat([cls, patches], dim=1) + self.image_pos  # [b, i, d], [CLS] first

    def encode_text(self, ids: Tensor) -> Tensor:
        return self.words(ids) + self.text_pos[:, : ids.shape[1]]  # [b, t, d], [CLS] first

    def forward(self, images: Tensor, ids: Tensor, text_mask: Tensor) -> Tensor:
        fused = self.fusion(self.encode_text(ids), self.encode_image(images), text_mask=text_mask)
        return self.head(fused.pooled)


def make_batch(batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Images of one colour plus noise; captions of 3-8 tokens with one colour word; label = colours agree."""
    image_color = torch.randint(0, len(COLORS), (batch,), generator=generator)
    match = torch.rand(batch, generator=generator) < 0.5
    offset = torch.randint(1, len(COLORS), (batch,), generator=generator)
    text_color = torch.where(match, image_color, (image_color + offset) % len(COLORS))
    noise = 0.3 * torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
    images = rearrange(COLORS[image_color], "b c -> b c 1 1") + noise
    lengths = torch.randint(3, 9, (batch,), generator=generator)
    ids = torch.randint(FIRST_COLOR_TOKEN + len(COLORS), VOCAB, (batch, 8), generator=generator)
    ids[:, 0] = CLS
    slot = 1 + (torch.rand(batch, generator=generator) * (lengths - 1)).long()
    ids[torch.arange(batch), slot] = FIRST_COLOR_TOKEN + text_color
    text_mask = torch.arange(8)[None, :] < lengths[:, None]  # True = real token
    ids = ids.masked_fill(~text_mask, PAD)
    return images, ids, text_mask, match.long()


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    # ALBEF-style one-way fusion: text attends to the image; the image tokens pass through unchanged.
    fusion = DualStreamFusion(DIM, depth=2, num_heads=HEADS, update_image=False)
    model = ColorCaptionClassifier(fusion)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    val_images, val_ids, val_mask, val_labels = make_batch(256, torch.Generator().manual_seed(1))

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(val_images, val_ids, val_mask).argmax(-1) == val_labels).float().mean())

    print(f"accuracy before training: {accuracy():.2f}")
    losses = []
    for _ in range(200):
        images, ids, mask, labels = make_batch(32, generator)
        loss = F.cross_entropy(model(images, ids, mask), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"loss first 20 steps {first:.3f} -> last 20 steps {last:.3f}")
    print(f"accuracy after training: {accuracy():.2f} (chance 0.50)")
    assert last < first, "training did not reduce the loss"

    # Activation checkpointing recomputes the fusion layers in backward: same gradients, less memory.
    images, ids, mask, labels = make_batch(8, generator)
    grads = []
    for enable in (False, True):
        fusion.set_grad_checkpointing(enable)
        model.zero_grad()
        F.cross_entropy(model(images, ids, mask), labels).backward()
        grad = model.words.weight.grad
        assert grad is not None
        grads.append(grad.clone())
    fusion.set_grad_checkpointing(False)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    print("grad checkpointing: same gradients: OK")
    model.eval()

    with torch.no_grad():
        text, image = model.encode_text(val_ids[:4]), model.encode_image(val_images[:4])
        reference = fusion(text, image, text_mask=val_mask[:4])

        # Padding invariance: extra padded positions (mask False) change nothing at real positions.
        padded_text = F.pad(text, (0, 0, 0, 5))
        padded_mask = F.pad(val_mask[:4], (0, 5), value=False)
        padded = fusion(padded_text, image, text_mask=padded_mask)
        assert torch.allclose(padded.pooled, reference.pooled, atol=1e-5)
        print("padding invariance: OK")

        # One-way form: image keys/values computed once per image and reused for many captions.
        image_kv = fusion.image_kv(image)
        cached = fusion(text, image, text_mask=val_mask[:4], image_kv=image_kv)
        assert torch.allclose(cached.pooled, reference.pooled, atol=1e-5)
        print(f"image_kv cache: {len(image_kv)} layers of keys {tuple(image_kv[0][0].shape)}: OK")

        # Attention maps (explicit path, equal to the SDPA path): text -> image of the last layer.
        explained = fusion(text, image, text_mask=val_mask[:4], return_attention=True)
        assert explained.attentions is not None
        cross = explained.attentions[-1]["text_to_image"]  # [b, heads, t, i]
        assert torch.allclose(explained.pooled, reference.pooled, atol=1e-5)
        assert torch.allclose(cross.sum(-1), torch.ones(()), atol=1e-5)  # each text token's weights over the image
        print(f"text_to_image attention {tuple(cross.shape)} [b, heads, t, i]: OK")

    # Any block fits the same slot; the head follows its out_dim.
    blocks: list[tuple[str, SingleStreamFusion | DualStreamFusion]] = [
        ("single_stream (ViLT)", SingleStreamFusion(DIM, depth=2, num_heads=HEADS)),
        ("dual_stream one-way (ALBEF)", DualStreamFusion(DIM, 2, HEADS, update_image=False)),
        ("dual_stream co-attention (METER)", DualStreamFusion(DIM, 2, HEADS, update_image=True)),
    ]
    for name, block in blocks:
        logits = ColorCaptionClassifier(block)(val_images[:2], val_ids[:2], val_mask[:2])
        print(f"{name}: out_dim {block.out_dim}, logits {tuple(logits.shape)}")
    print("fusion example: OK")


if __name__ == "__main__":
    main()
