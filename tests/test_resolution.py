"""Loading a checkpoint at another image_size: position embeddings interpolated as timm / open_clip do it
(prefix tokens kept: 1 class token, class + register tokens, or none as SigLIP), for native, timm,
open_clip and converted towers; the rebuilt tower equals the library's own model loaded at the new size."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import vlp
from vlp.errors import UserError
from vlp.models import VLPModel

ROOT = Path(__file__).resolve().parents[1]
TEXT: dict[str, Any] = {"type": "transformer", "tokenizer": "synthetic", "width": 32, "depth": 1, "num_heads": 2}


def _saved(image: dict[str, Any], tmp_path: Path) -> tuple[VLPModel, Path]:
    torch.manual_seed(0)
    model = VLPModel.from_config({"image": image, "text": TEXT, "fusion": {"type": "none"}, "embed_dim": 16,
                                  "itm_head": False})
    with torch.no_grad():  # position embeddings that are not smooth: interpolation differences show
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path / "ckpt")
    return model.eval(), tmp_path / "ckpt"


def _pixels(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_native_vit_equals_timm_resample_and_saves_at_the_new_size(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    from timm.layers import resample_abs_pos_embed

    model, ckpt = _saved({"type": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1,
                          "num_heads": 2}, tmp_path)
    with caplog.at_level(logging.INFO, logger="vlp"):
        resized, _, transform = vlp.load(ckpt, image_size=48)
    notes = [r.getMessage() for r in caplog.records if r.name == "vlp"]
    assert notes == ["image_size 32 -> 48: image_encoder.pos_embed resampled from a 4x4 to a 6x6 patch grid "
                     "(1 prefix token kept)"]
    expected = resample_abs_pos_embed(model.image_encoder.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    torch.testing.assert_close(resized.image_encoder.pos_embed.detach(), expected, atol=0, rtol=0)
    old, new = model.state_dict(), resized.state_dict()
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if k != "image_encoder.pos_embed")
    assert resized.config.image.image_size == 48 and transform.transforms[1].size == [48]
    assert not resized.training and torch.isfinite(resized.encode_image(_pixels(48))).all()
    resized.save_pretrained(tmp_path / "at48")  # a checkpoint at the new size loads as it is
    again = VLPModel.from_pretrained(tmp_path / "at48")
    assert torch.equal(again.image_encoder.pos_embed, resized.image_encoder.pos_embed)
    assert VLPModel.from_pretrained(ckpt, image_size=32).image_encoder.pos_embed.shape == (1, 17, 32)


@pytest.mark.parametrize("options, prefix", [
    ({"reg_tokens": 2}, 3),                                   # class + register tokens keep their positions
    ({"class_token": False, "global_pool": "avg"}, 0),       # SigLIP-style: no prefix tokens
    ({"no_embed_class": True}, 0),                           # a class token without a position
])
def test_timm_tower_equals_timm_loading_at_the_new_size(options: dict[str, Any], prefix: int,
                                                        tmp_path: Path) -> None:
    import timm
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer import checkpoint_filter_fn

    arch = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, **options}
    model, ckpt = _saved({"type": "timm", "name": "vit_tiny_patch16_224", "image_size": 32, "options": arch}, tmp_path)
    resized = VLPModel.from_pretrained(ckpt, image_size=48)
    old_state = model.image_encoder.model.state_dict()
    # timm's own: a model created at the new size, loaded through its pretrained-weights filter
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=48, **arch)
    reference.load_state_dict(checkpoint_filter_fn(old_state, reference))
    expected = resample_abs_pos_embed(old_state["pos_embed"], new_size=[6, 6], num_prefix_tokens=prefix)
    torch.testing.assert_close(resized.image_encoder.model.pos_embed.detach(), expected, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(resized.image_encoder(_pixels(48)).tokens,
                                   reference.eval().forward_features(_pixels(48)), atol=1e-5, rtol=1e-5)


def test_converted_open_clip_equals_open_clip_load_checkpoint(tmp_path: Path) -> None:
    import open_clip

    from vlp.convert import convert

    text_cfg = {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    cfg: dict[str, Any] = {"embed_dim": 24, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32,
                                                           "layers": 1, "head_width": 16}, "text_cfg": text_cfg}
    torch.manual_seed(0)
    source = open_clip.CLIP(**cfg)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    src = tmp_path / "oc"
    src.mkdir()
    safetensors.torch.save_file(source.state_dict(), str(src / "open_clip_model.safetensors"))
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    convert("open_clip", src, tmp_path / "vlp")
    resized = VLPModel.from_pretrained(tmp_path / "vlp", image_size=40)
    assert resized.config.image.options["image_size"] == 40  # the converter's tower override follows
    # open_clip's own: a model built at 40 px, loaded by its load_checkpoint (which calls resize_pos_embed)
    reference = open_clip.CLIP(**{**cfg, "vision_cfg": {**cfg["vision_cfg"], "image_size": 40}})
    open_clip.load_checkpoint(reference, str(src / "open_clip_model.safetensors"))
    torch.testing.assert_close(resized.image_encoder.visual.positional_embedding, reference.visual.positional_embedding,
                               atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(resized.encode_image(_pixels(40)),
                                   reference.eval().encode_image(_pixels(40), normalize=True), atol=1e-5, rtol=1e-5)


def test_converted_siglip_keeps_no_prefix_token(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import SiglipConfig, SiglipModel

    from vlp.convert import convert

    backend = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "red": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    src = tmp_path / "hf"
    src.mkdir()
    backend.save(str(src / "tokenizer.json"))
    width = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config={**width, "vocab_size": 4, "max_position_embeddings": 8},
                             vision_config={**width, "image_size": 16, "patch_size": 8})).save_pretrained(src)
    convert("siglip", src, tmp_path / "vlp")
    model = VLPModel.from_pretrained(tmp_path / "vlp")
    resized = VLPModel.from_pretrained(tmp_path / "vlp", image_size=32)
    old = model.image_encoder.model.pos_embed.detach()
    assert old.shape == (1, 4, 32) and model.image_encoder.model.num_prefix_tokens == 0
    expected = resample_abs_pos_embed(old, new_size=[4, 4], num_prefix_tokens=0)
    torch.testing.assert_close(resized.image_encoder.model.pos_embed.detach(), expected, atol=0, rtol=0)
    assert torch.isfinite(resized.encode_image(_pixels(32))).all()


def test_size_dependent_tensors_other_than_positions_fail_in_one_line(tmp_path: Path) -> None:
    _, ckpt = _saved({"type": "open_clip", "image_size": 64,
                      "options": {"layers": [1, 1, 1, 1], "width": 16, "head_width": 8, "embed_dim": 16}}, tmp_path)
    with pytest.raises(UserError, match=r"cannot change the image size .*attnpool.positional_embedding \[5, 512\]"):
        VLPModel.from_pretrained(ckpt, image_size=96)
    _, trunk = _saved({"type": "open_clip", "image_size": 224, "options": {
        "timm_model_name": "vit_tiny_patch16_224", "timm_pool": "", "embed_dim": 16}}, tmp_path / "trunk")
    with pytest.raises(UserError, match="open_clip builds its timm trunk 'vit_tiny_patch16_224' at that model's own"):
        VLPModel.from_pretrained(trunk, image_size=256)
    _, vit = _saved({"type": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2},
                    tmp_path / "vit")
    with pytest.raises(UserError, match="image.patch_size' = 8: image_size 50 is not divisible"):
        VLPModel.from_pretrained(vit, image_size=50)
