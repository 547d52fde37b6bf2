"""The Python API as Hugging Face and open_clip users call it: ``tokenizer(texts)``, ``model(pixel_values=...,
input_ids=..., attention_mask=...)``, image transforms for any Pillow mode or numpy array, ``vlp.load(run_dir)``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlp
from vlp.data.tokenizers import word_tokenizer
from vlp.data.transforms import array_to_rgb, eval_transform, train_transform
from vlp.errors import UserError
from vlp.models import VLPModel, VLPOutput

CAPTIONS = ["a large red circle at the top left", "a small blue square", "two shapes: a green cross and a circle"]


@pytest.fixture(scope="module")
def fused() -> VLPModel:
    torch.manual_seed(0)
    return VLPModel.from_config("albef_base_tiny").eval()


@pytest.fixture(scope="module")
def saved(fused: VLPModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    fused.save_pretrained(run / "final")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return run


def _pixels(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# tokenizer ------------------------------------------------------------------------------------------------


def test_tokenizer_defaults_to_the_checkpoints_max_length(saved: Path) -> None:
    model, tokenizer, _ = vlp.load(saved / "final")
    assert model.config.text.max_length == 30 and tokenizer.model_max_length == 30
    given = tokenizer(CAPTIONS, max_length=30)
    default = tokenizer(CAPTIONS)
    assert torch.equal(default["input_ids"], given["input_ids"])
    assert torch.equal(default["attention_mask"], given["attention_mask"])
    long = tokenizer(["red " * 100])  # truncated at the model's length, the final [SEP] kept
    assert long["input_ids"].shape == (1, 30) and int(long["input_ids"][0, -1]) == tokenizer.backend.token_to_id("[SEP]")


def test_a_tokenizer_of_no_model_asks_for_max_length() -> None:
    tokenizer = word_tokenizer(["red", "circle"])
    with pytest.raises(UserError, match="pass max_length"):
        tokenizer(["red circle"])
    assert tokenizer(["red circle"], max_length=8)["input_ids"].shape == (1, 4)


# forward ----------------------------------------------------------------------------------------------------


def test_forward_gives_clip_style_logits_and_itm_of_aligned_rows(fused: VLPModel) -> None:
    tokens = fused.tokenizer(CAPTIONS)
    pixels = _pixels(3)
    with torch.no_grad():
        out = fused(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        image_emb = fused.encode_image(pixels)
        text_emb = fused.encode_text(tokens["input_ids"], tokens["attention_mask"])
        itm = fused.itm_logits(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert isinstance(out, VLPOutput)
    assert fused.logit_bias() is None  # softmax ITC has no bias
    torch.testing.assert_close(out.image_embeds, image_emb)
    torch.testing.assert_close(out.text_embeds, text_emb)
    # open_clip: logits_per_image = logit_scale * image @ text.T, logits_per_text = its transpose
    torch.testing.assert_close(out.logits_per_image, fused.logit_scale() * image_emb @ text_emb.T)
    assert out.logits_per_text is not None and out.logits_per_image is not None
    assert torch.equal(out.logits_per_text, out.logits_per_image.T)
    assert out.itm_logits is not None and out.itm_logits.shape == (3, 2)
    torch.testing.assert_close(out.itm_logits, itm)


def test_forward_with_one_input_or_unaligned_batches(fused: VLPModel) -> None:
    tokens = fused.tokenizer(CAPTIONS[:2])
    with torch.no_grad():
        images_only = fused(pixel_values=_pixels(3))
        texts_only = fused(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        unaligned = fused(pixel_values=_pixels(3), **tokens)
        no_mask = fused(input_ids=tokens["input_ids"][:1])
    assert images_only.image_embeds is not None and images_only.image_embeds.shape == (3, 16)
    assert images_only.text_embeds is None and images_only.logits_per_image is None
    assert texts_only.text_embeds is not None and texts_only.image_embeds is None
    assert unaligned.logits_per_image is not None and unaligned.logits_per_image.shape == (3, 2)
    assert unaligned.itm_logits is None  # no aligned rows
    # the first caption has no padding, so "every token is real" is its own mask
    assert texts_only.text_embeds is not None and no_mask.text_embeds is not None
    torch.testing.assert_close(no_mask.text_embeds[0], texts_only.text_embeds[0])
    with pytest.raises(ValueError, match="pixel_values, input_ids or both"):
        fused()


def test_siglip_logits_carry_the_bias() -> None:
    torch.manual_seed(0)
    model = VLPModel.from_config("siglip_base_tiny").eval()
    bias = model.logit_bias()
    assert bias is not None and float(bias) == pytest.approx(-10.0)
    tokens = model.tokenizer(CAPTIONS)
    with torch.no_grad():
        out = model(pixel_values=_pixels(3), **tokens)
    assert out.image_embeds is not None and out.text_embeds is not None and out.logits_per_text is not None
    # Hugging Face SigLIP: logits_per_text = text @ image.T * scale + bias
    expected = out.text_embeds @ out.image_embeds.T * model.logit_scale() + bias
    torch.testing.assert_close(out.logits_per_text, expected)
    assert out.itm_logits is None  # a dual encoder


# image transforms ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "I;16", "I", "F", "CMYK", "RGB"])
def test_transforms_accept_every_pillow_mode(mode: str) -> None:
    image = Image.new(mode, (40, 30))
    for transform in (eval_transform(32, (0.5,) * 3, (0.5,) * 3), train_transform(32, (0.5,) * 3, (0.5,) * 3)):
        out = transform(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_transparent_pixels_become_white_and_arrays_equal_images() -> None:
    transform = eval_transform(8, (0.0,) * 3, (1.0,) * 3)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent: composited on white
    assert torch.allclose(transform(Image.fromarray(rgba)), torch.ones(3, 8, 8))
    assert torch.allclose(transform(rgba), torch.ones(3, 8, 8))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    from_pil = transform(Image.fromarray(pixels))
    assert torch.equal(transform(pixels), from_pil)
    assert torch.equal(transform(pixels.astype(np.float32) / 255.0), from_pil)  # float in [0, 1]
    assert torch.equal(transform(np.moveaxis(pixels, -1, 0).copy()), from_pil)  # channels first
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    assert torch.equal(transform(gray), transform(Image.fromarray(gray)))
    assert torch.equal(transform(gray[..., None]), transform(gray))
    assert array_to_rgb(gray.astype(np.uint16) * 257).getpixel((0, 0)) == (int(gray[0, 0]),) * 3


def test_unreadable_array_shapes_are_one_error() -> None:
    with pytest.raises(UserError, match="HxW or HxWxC"):
        eval_transform(8, (0.5,) * 3, (0.5,) * 3)(np.zeros((8, 8, 2), dtype=np.uint8))


# loading a run directory ------------------------------------------------------------------------------


def test_load_accepts_a_run_directory(saved: Path, fused: VLPModel) -> None:
    model, tokenizer, transform = vlp.load(saved)
    again = VLPModel.from_pretrained(saved)
    for loaded in (model, again):
        for (name, ours), (_, theirs) in zip(loaded.state_dict().items(), fused.state_dict().items()):
            assert torch.equal(ours, theirs), name
    assert tokenizer(CAPTIONS)["input_ids"].shape[0] == 3
    assert transform(Image.new("RGBA", (50, 40))).shape == (3, 32, 32)


def test_a_run_without_final_lists_its_checkpoints(fused: VLPModel, tmp_path: Path) -> None:
    run = tmp_path / "stopped"
    for step in (4, 12):
        fused.save_pretrained(run / "checkpoints" / f"step_{step}")
    (run / "metrics.jsonl").write_text('{"step": 12}\n')
    with pytest.raises(UserError) as err:
        vlp.load(run)
    message = str(err.value)
    assert "run directory without a final/ checkpoint" in message
    assert f"{run}/checkpoints/step_4, {run}/checkpoints/step_12" in message
    assert VLPModel.from_pretrained(run / "checkpoints" / "step_4") is not None
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a vlp checkpoint"):
        vlp.load(tmp_path / "empty")
