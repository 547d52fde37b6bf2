"""A frozen teacher for contrastive training (``objective.distill_from``): its ITC logits are soft targets.

The teacher is any vlp checkpoint with a softmax ITC (a converted open_clip/CLIP checkpoint, or an earlier
run). It sees what the student sees, in its own terms: the batch's captions re-tokenized by its tokenizer
(at its ``max_length``), and the student's augmented images brought back to pixels and re-transformed to
its resolution and normalization. It runs in eval mode under ``no_grad``, is never saved with the student
(the checkpoint path is the config), and never draws from the RNG, so resuming and the gradient-cache
replay are unaffected by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from vlp.errors import ConfigError, UserError
from vlp.losses.distill import teacher_distill_loss
from vlp.models.vlp_model import VLPModel

__all__ = ["Teacher", "load_teacher"]


class Teacher(nn.Module):
    """``model`` (frozen, always in eval mode) scoring batches whose images were normalized with
    ``student_mean`` / ``student_std``."""

    def __init__(self, model: VLPModel, student_mean: Sequence[float], student_std: Sequence[float]) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.student_mean, self.student_std = list(student_mean), list(student_std)

    def train(self, mode: bool = True) -> Teacher:
        # the teacher's dropout (and any patch dropout) stays off while the student trains
        return super().train(False)

    def teacher_images(self, images: Tensor) -> Tensor:
        """Student-normalized images [B, 3, H, W] -> the teacher's size and normalization: un-normalize to
        [0, 1] pixels, resize (bicubic, antialiased, as the image transforms), clip, normalize."""
        encoder = self.model.image_encoder
        pixels = images.float() * images.new_tensor(self.student_std).view(1, -1, 1, 1).float()
        pixels = pixels + images.new_tensor(self.student_mean).view(1, -1, 1, 1).float()
        if pixels.shape[-2:] != (encoder.image_size, encoder.image_size):
            pixels = TF.resize(pixels, [encoder.image_size, encoder.image_size],
                               interpolation=InterpolationMode.BICUBIC, antialias=True)
        pixels = pixels.clamp(0.0, 1.0)  # bicubic overshoot; the student's images came from 8-bit pixels
        return TF.normalize(pixels, list(encoder.mean), list(encoder.std))

    @torch.no_grad()
    def embeddings(self, images: Tensor, captions: Sequence[str], chunk_size: int = 0) -> tuple[Tensor, Tensor]:
        """The teacher's L2-normalized (image, text) embeddings of a batch, ``chunk_size`` rows at a time
        (0 = all at once)."""
        model = self.model
        if len(captions) != images.shape[0]:
            raise ValueError(f"{len(captions)} captions for {images.shape[0]} images")
        step = chunk_size if chunk_size > 0 else max(images.shape[0], 1)
        image_parts, text_parts = [], []
        for start in range(0, images.shape[0], step):
            rows = slice(start, start + step)
            tokens = model.tokenizer(list(captions[rows]), max_length=model.config.text.max_length)
            ids = tokens["input_ids"].to(images.device)
            mask = tokens["attention_mask"].to(images.device)
            image_parts.append(model.image_features(self.teacher_images(images[rows]), pooled_only=True)[1])
            text_parts.append(model.text_features(ids, mask, pooled_only=True)[1])
        return torch.cat(image_parts), torch.cat(text_parts)

    def distill_loss(self, image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, images: Tensor,
                     captions: Sequence[str] | None, local_loss: bool = False, chunk_size: int = 0) -> Tensor:
        """DistillClipLoss's distill term of the student's embeddings against this teacher's on the same batch."""
        if captions is None:
            raise UserError("objective.distill_from: the batch has no captions for the teacher to re-tokenize")
        teacher_image, teacher_text = self.embeddings(images, captions, chunk_size)
        with torch.no_grad():
            teacher_scale = self.model.logit_scale()
        return teacher_distill_loss(image_emb, text_emb, logit_scale, teacher_image, teacher_text, teacher_scale,
                                    local_loss=local_loss)


def load_teacher(path: str, student: VLPModel) -> Teacher:
    """The teacher checkpoint ``path`` for ``student``; a SigLIP student or teacher is one ConfigError line."""
    if student.contrastive == "siglip":
        raise ConfigError("objective.distill_from needs a softmax-ITC student (model.contrastive: itc); "
                          "distilling a SigLIP (sigmoid) model is not supported")
    if not Path(path).is_dir():
        raise UserError(f"objective.distill_from: checkpoint directory not found: {path}")
    try:
        teacher = VLPModel.from_pretrained(path)
    except UserError as error:
        raise UserError(f"objective.distill_from {path}: {error}") from None
    if teacher.contrastive == "siglip":
        raise ConfigError(f"objective.distill_from {path}: the teacher is a SigLIP model (sigmoid loss); "
                          "distillation needs a softmax-ITC teacher (model.contrastive: itc)")
    encoder = student.image_encoder
    return Teacher(teacher, encoder.mean, encoder.std)
