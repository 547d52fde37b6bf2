"""Encoders: every registry entry at tiny size, equality with open_clip / timm / transformers, weights, checkpointing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlp.config.schema import ImageEncoderConfig, TextEncoderConfig
from vlp.data.tokenizers import Tokenizer, clip_tokenizer, word_tokenizer
from vlp.encoders import build_image_encoder, build_text_encoder
from vlp.encoders.base import ImageEncoder, TextEncoder
from vlp.errors import ConfigError, UserError
from vlp.registry import image_encoders, text_encoders

WORDS = ["a", "red", "blue", "green", "cube", "ball", "left", "right", "of", "the", "is", "what", "color"]
CAPTIONS = ["a red cube left of the blue ball", "the green ball", "what color is the cube right of a ball"]
TINY_VIT: dict[str, Any] = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}

IMAGE_CONFIGS: dict[str, ImageEncoderConfig] = {
    "vit": ImageEncoderConfig(type="vit", image_size=32, patch_size=8, width=32, depth=2, num_heads=2),
    "timm": ImageEncoderConfig(type="timm", name="vit_tiny_patch16_224", image_size=32, options=TINY_VIT),
    "open_clip": ImageEncoderConfig(type="open_clip", image_size=32, patch_size=8, width=32, depth=2, num_heads=2,
                                    options={"embed_dim": 16}),
}
TEXT_CONFIGS: dict[str, TextEncoderConfig] = {
    "transformer": TextEncoderConfig(type="transformer", width=32, depth=2, num_heads=2, max_length=16),
    "hf": TextEncoderConfig(type="hf", width=32, depth=2, num_heads=2, max_length=16),
    "open_clip": TextEncoderConfig(type="open_clip", width=32, depth=2, num_heads=2, max_length=16,
                                   options={"embed_dim": 16}),
}
# The first block of each encoder: checkpointing starts its forward twice (forward + recompute; the recompute
# may stop early, so a pre-hook counts).
FIRST_BLOCK: dict[str, Callable[[Any], nn.Module]] = {
    "image/vit": lambda e: e.blocks[0],
    "image/timm": lambda e: e.model.blocks[0],
    "image/open_clip": lambda e: e.visual.transformer.resblocks[0],
    "text/transformer": lambda e: e.blocks[0],
    "text/hf": lambda e: e.model.encoder.layer[0].attention,  # transformers checkpoints inside forward
    "text/open_clip": lambda e: e.text.transformer.resblocks[0],
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return word_tokenizer(WORDS)


def _image_loss(encoder: ImageEncoder, images: torch.Tensor) -> torch.Tensor:
    out = encoder(images)
    return out.tokens.square().mean() + out.pooled.square().mean()


def _text_loss(encoder: TextEncoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = encoder(**batch)
    return out.tokens[out.mask].square().mean() + out.pooled.square().mean()


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_every_registry_entry_has_a_tiny_config() -> None:
    assert set(image_encoders.names()) == set(IMAGE_CONFIGS)
    assert set(text_encoders.names()) == set(TEXT_CONFIGS)


@pytest.mark.parametrize("name", sorted(IMAGE_CONFIGS))
def test_image_encoder_shapes_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    encoder = build_image_encoder(IMAGE_CONFIGS[name])
    out = encoder(torch.randn(2, 3, 32, 32))
    assert out.tokens.shape == (2, 17, encoder.width) and encoder.width == 32  # CLS + 4x4 patches
    assert out.pooled.shape == (2, encoder.embed_dim)
    assert out.mask.dtype == torch.bool and out.mask.shape == (2, 17) and bool(out.mask.all())
    assert encoder.image_size == 32 and len(encoder.mean) == len(encoder.std) == 3
    (out.tokens.square().mean() + out.pooled.square().mean()).backward()
    for param_name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("name", sorted(TEXT_CONFIGS))
def test_text_encoder_shapes_gradients_and_padding(name: str, tokenizer: Tokenizer) -> None:
    torch.manual_seed(0)
    encoder = build_text_encoder(TEXT_CONFIGS[name], tokenizer).eval()
    batch = tokenizer(CAPTIONS, 16)
    out = encoder(**batch)
    steps = batch["input_ids"].shape[1]
    assert out.tokens.shape == (3, steps, encoder.width) and out.pooled.shape == (3, encoder.embed_dim)
    assert out.mask.dtype == torch.bool and torch.equal(out.mask, batch["attention_mask"])
    assert encoder.vocab_size >= tokenizer.vocab_size
    embeddings = encoder.embeddings  # what an MLM head ties to
    assert isinstance(embeddings, nn.Embedding) and embeddings.num_embeddings == encoder.vocab_size
    # the shortest caption alone (no padding) gives the same states as inside the padded batch
    alone = encoder(**tokenizer(CAPTIONS[1:2], 16))
    length = alone.tokens.shape[1]
    torch.testing.assert_close(alone.pooled[0], out.pooled[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.tokens[0], out.tokens[1, :length], atol=1e-5, rtol=1e-5)
    _text_loss(encoder, batch).backward()
    for param_name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("key", sorted(FIRST_BLOCK))
def test_grad_checkpointing_same_gradients(key: str, tokenizer: Tokenizer) -> None:
    side, name = key.split("/")
    torch.manual_seed(0)
    encoder: Any = build_image_encoder(IMAGE_CONFIGS[name]) if side == "image" else build_text_encoder(
        TEXT_CONFIGS[name], tokenizer)
    encoder.train()  # transformers only checkpoints in training mode; all dropout is 0
    images, batch = torch.randn(2, 3, 32, 32), tokenizer(CAPTIONS, 16)
    calls: list[int] = []
    FIRST_BLOCK[key](encoder).register_forward_pre_hook(lambda *_: calls.append(1))

    def gradients(enable: bool) -> dict[str, torch.Tensor]:
        encoder.zero_grad(set_to_none=True)
        encoder.set_grad_checkpointing(enable)
        calls.clear()
        loss = _image_loss(encoder, images) if side == "image" else _text_loss(encoder, batch)
        loss.backward()
        return _grads(encoder)

    plain = gradients(False)
    assert len(calls) == 1
    checkpointed = gradients(True)
    assert len(calls) == 2  # recomputed in backward: checkpointing is really on
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(encoder.parameters()))
    for param_name in plain:
        torch.testing.assert_close(checkpointed[param_name], plain[param_name], atol=1e-5, rtol=1e-5)


def test_unknown_type_names_known_ones(tokenizer: Tokenizer) -> None:
    with pytest.raises(ConfigError, match="did you mean 'vit'.*known: open_clip, timm, vit"):
        build_image_encoder(ImageEncoderConfig(type="vitt"))
    with pytest.raises(ConfigError, match="text.type"):
        build_text_encoder(TextEncoderConfig(type="bert"), tokenizer)


# ---------------------------------------------------------------------------------------------- native


def test_vit_checks_sizes() -> None:
    with pytest.raises(ConfigError, match="image.image_size 30 is not divisible by image.patch_size 8"):
        build_image_encoder(ImageEncoderConfig(image_size=30, patch_size=8, width=32, depth=1, num_heads=2))
    encoder = build_image_encoder(IMAGE_CONFIGS["vit"])
    with pytest.raises(ValueError, match="32x32"):
        encoder(torch.randn(1, 3, 16, 16))


def test_text_transformer_pooling_and_attention_direction(tokenizer: Tokenizer) -> None:
    batch = tokenizer(CAPTIONS, 16)
    mask = batch["attention_mask"]
    base = TEXT_CONFIGS["transformer"]
    torch.manual_seed(0)
    for pooling in ("cls", "eos", "mean"):
        torch.manual_seed(0)
        encoder = build_text_encoder(TextEncoderConfig(**{**base.__dict__, "pooling": pooling}), tokenizer).eval()
        out = encoder(**batch)
        last = mask.sum(1) - 1
        expected = {"cls": out.tokens[:, 0], "eos": out.tokens[torch.arange(3), last],
                    "mean": torch.stack([out.tokens[i, mask[i]].mean(0) for i in range(3)])}[pooling]
        torch.testing.assert_close(out.pooled, expected)
    # bidirectional: changing the last word changes the first token; causal: it cannot
    changed = batch["input_ids"].clone()
    green = tokenizer.backend.token_to_id("green")
    assert green is not None and green not in changed[0].tolist()
    changed[0, mask[0].sum() - 2] = green
    for causal, pooling in ((False, "cls"), (True, "eos")):
        encoder = build_text_encoder(
            TextEncoderConfig(**{**base.__dict__, "causal": causal, "pooling": pooling}), tokenizer).eval()
        assert encoder.bidirectional is not causal
        first = encoder(batch["input_ids"], mask).tokens[0, 0]
        first_changed = encoder(changed, mask).tokens[0, 0]
        assert torch.allclose(first, first_changed) is causal
    with pytest.raises(ConfigError, match="only sees itself"):
        build_text_encoder(TextEncoderConfig(**{**base.__dict__, "causal": True}), tokenizer)


@pytest.mark.parametrize("grad_checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["vit", "text_cls", "text_eos_causal", "open_clip_image", "open_clip_text"])
def test_pooled_only_equals_full_pooled_output_and_gradients(kind: str, grad_checkpointing: bool,
                                                             tokenizer: Tokenizer) -> None:
    """pooled_only computes the last block for the pooled row only (what ITC alone reads): same pooled output
    and parameter gradients as the full pass, also with padded captions and a causal EOS-pooled tower."""
    torch.manual_seed(0)
    if kind in ("vit", "open_clip_image"):
        encoder: Any = build_image_encoder(IMAGE_CONFIGS[kind.removesuffix("_image")]).train()
        inputs: dict[str, Any] = {"images": torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    elif kind == "open_clip_text":
        encoder = build_text_encoder(TEXT_CONFIGS["open_clip"], tokenizer).train()
        inputs = dict(tokenizer(CAPTIONS, 16))
        inputs = {key: torch.nn.functional.pad(value, (0, 16 - value.shape[1])) for key, value in inputs.items()}
    else:
        causal = kind == "text_eos_causal"
        cfg = TextEncoderConfig(**{**TEXT_CONFIGS["transformer"].__dict__, "causal": causal,
                                   "pooling": "eos" if causal else "cls"})
        encoder = build_text_encoder(cfg, tokenizer).train()
        inputs = dict(tokenizer(CAPTIONS, 16))
        assert not bool(inputs["attention_mask"].all())  # padded rows are part of the check
        # fixed-length padding (as CLIP's 77 tokens): columns no row uses, dropped by pooled_only
        inputs = {key: torch.nn.functional.pad(value, (0, 16 - value.shape[1])) for key, value in inputs.items()}
    encoder.set_grad_checkpointing(grad_checkpointing)
    head = torch.randn(encoder.embed_dim if kind.startswith("open_clip") else 32,
                       generator=torch.Generator().manual_seed(2))

    def run(pooled_only: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        encoder.zero_grad()
        out = encoder(**inputs, pooled_only=pooled_only)
        (out.pooled @ head).sum().backward()
        return out.pooled.detach(), out.tokens, _grads(encoder)

    full_pooled, full_tokens, full_grads = run(False)
    pooled, tokens, grads = run(True)
    torch.testing.assert_close(pooled, full_pooled, atol=1e-5, rtol=1e-5)
    assert tokens.shape[1] == 1 < full_tokens.shape[1]
    assert grads.keys() == full_grads.keys() and len(grads) > 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


# ------------------------------------------------------------------------------------------- open_clip


def _tiny_clip(vision: dict[str, Any], text: dict[str, Any]) -> Any:
    import open_clip

    torch.manual_seed(0)
    return open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()


def _save(state: dict[str, torch.Tensor], path: Path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.mark.parametrize(("vision", "tokens"), [
    ({"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}, (17, 32)),
    ({"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, "pool_type": "avg"}, (17, 32)),
    ({"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8}, (1, 256)),  # ModifiedResNet
], ids=["vit", "vit_avg", "resnet"])
def test_open_clip_image_equals_open_clip(vision: dict[str, Any], tokens: tuple[int, int], tmp_path: Path) -> None:
    import open_clip

    reference = open_clip.CLIP(embed_dim=16, vision_cfg=vision,
                               text_cfg={"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1})
    reference.eval()
    weights = _save(reference.state_dict(), tmp_path / "clip.safetensors")
    cfg = ImageEncoderConfig(type="open_clip", image_size=32, weights=weights, options={"embed_dim": 16, **vision})
    encoder: Any = build_image_encoder(cfg).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = encoder(images)
        expected = reference.encode_image(images, normalize=True)
    torch.testing.assert_close(F.normalize(out.pooled, dim=-1), expected, atol=1e-5, rtol=1e-5)
    assert out.tokens.shape == (3, *tokens) and encoder.width == tokens[1] and encoder.embed_dim == 16
    if "pool_type" not in vision and "patch_size" in vision:
        torch.testing.assert_close(out.tokens[:, 0] @ encoder.visual.proj, out.pooled)  # CLS after ln_post


@pytest.mark.parametrize("text", [
    {"context_length": 24, "vocab_size": 49409, "width": 32, "heads": 2, "layers": 2},
    {"context_length": 24, "vocab_size": 49409, "width": 32, "heads": 2, "layers": 1, "no_causal_mask": True,
     "pool_type": "last", "proj_bias": True},  # SigLIP-like: sees the padding, fed the full context
], ids=["causal_argmax", "bidirectional_last"])
def test_open_clip_text_equals_open_clip(text: dict[str, Any], tmp_path: Path) -> None:
    import open_clip

    clip = clip_tokenizer()
    vision = {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8}
    reference = open_clip.CLIP(embed_dim=16, vision_cfg=vision, text_cfg=text).eval()  # CLIP (flat) layout
    weights = _save(reference.state_dict(), tmp_path / "clip.safetensors")
    cfg = TextEncoderConfig(type="open_clip", tokenizer="clip", weights=weights, max_length=24,
                            options={"embed_dim": 16, **text})
    encoder = build_text_encoder(cfg, clip).eval()
    assert encoder.bidirectional is bool(text.get("no_causal_mask"))
    captions = ["a photo of a cat", "two dogs playing in the park on a sunny afternoon", "hi"]
    with torch.no_grad():
        expected = reference.encode_text(open_clip.tokenize(captions, context_length=24), normalize=True)
        for batch in (clip(captions, 24), clip(captions[::2], 24)):  # the second pads to a shorter length
            assert batch["input_ids"].shape[1] < 24
            pooled = F.normalize(encoder(**batch).pooled, dim=-1)
            rows = [0, 1, 2] if len(pooled) == 3 else [0, 2]
            torch.testing.assert_close(pooled, expected[rows], atol=1e-5, rtol=1e-5)


def test_open_clip_weights_errors(tmp_path: Path, tokenizer: Tokenizer) -> None:
    vision = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16}
    other = _tiny_clip({**vision, "layers": 1}, {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2,
                                                  "layers": 1})
    weights = _save(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(UserError) as info:
        build_image_encoder(ImageEncoderConfig(type="open_clip", image_size=32, weights=weights,
                                               options={"embed_dim": 16, **vision}))
    message = str(info.value)
    assert "\n" not in message and "missing: visual.transformer.resblocks.1" in message
    with pytest.raises(UserError, match="wrong shape .*text.token_embedding.weight \\[64, 32\\] vs \\[100, 32\\]"):
        build_text_encoder(TextEncoderConfig(type="open_clip", weights=weights, max_length=16, width=32,
                                             num_heads=2, depth=1, vocab_size=100, options={"embed_dim": 16}),
                           tokenizer)
    with pytest.raises(UserError, match="pretrained tag"):
        build_image_encoder(ImageEncoderConfig(type="open_clip", name="ViT-B-32", weights="openai"))
    with pytest.raises(UserError, match="never downloads"):
        build_image_encoder(ImageEncoderConfig(type="open_clip", name="hf-hub:timm/ViT-B-16-SigLIP"))
    with pytest.raises(UserError, match="does not exist"):
        build_text_encoder(TextEncoderConfig(type="open_clip", name="ViT-B-32", weights="/no/such.pt"), tokenizer)
    with pytest.raises(ConfigError, match="did you mean 'head_width'"):
        build_image_encoder(ImageEncoderConfig(type="open_clip", options={"head_widht": 16}))
    with pytest.raises(ConfigError, match="did you mean 'ViT-B-32'"):
        build_image_encoder(ImageEncoderConfig(type="open_clip", name="ViT-B-33"))


# ------------------------------------------------------------------------------------------------ timm


def test_timm_weights_round_trip_and_errors(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(1)
    reference: Any = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                                       **TINY_VIT).eval()
    weights = _save(reference.state_dict(), tmp_path / "vit.safetensors")
    encoder = build_image_encoder(ImageEncoderConfig(**{**IMAGE_CONFIGS["timm"].__dict__, "weights": weights}))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = encoder.eval()(images)
        torch.testing.assert_close(out.tokens, reference.forward_features(images), atol=0, rtol=0)
        torch.testing.assert_close(out.pooled, reference(images), atol=0, rtol=0)
    # a classifier head in the file is dropped (num_classes=0), like timm's pretrained loading
    with_head = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, **TINY_VIT)
    build_image_encoder(ImageEncoderConfig(**{**IMAGE_CONFIGS["timm"].__dict__,
                                              "weights": _save(with_head.state_dict(), tmp_path / "head.safetensors")}))
    deeper = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32,
                               **{**TINY_VIT, "depth": 2})
    mismatched = _save(deeper.state_dict(), tmp_path / "deeper.safetensors")
    corrupted = tmp_path / "corrupted.safetensors"
    corrupted.write_bytes(b"\x00garbage" * 10)
    for path, expected in ((mismatched, "unexpected: blocks.1."), (str(corrupted), "cannot read weights file")):
        with pytest.raises(UserError) as info:
            build_image_encoder(ImageEncoderConfig(**{**IMAGE_CONFIGS["timm"].__dict__, "weights": path}))
        assert expected in str(info.value) and "\n" not in str(info.value)


def test_timm_cnn_feature_map_becomes_tokens() -> None:
    encoder: Any = build_image_encoder(ImageEncoderConfig(type="timm", name="resnet10t", image_size=64))
    out = encoder(torch.randn(2, 3, 64, 64))
    assert out.tokens.shape == (2, 4, encoder.width) and out.pooled.shape == (2, encoder.embed_dim)
    features = encoder.model.forward_features(torch.zeros(1, 3, 64, 64))
    torch.testing.assert_close(encoder(torch.zeros(1, 3, 64, 64)).tokens[0, 1], features[0, :, 0, 1])
    with pytest.raises(ConfigError, match="not allowed"):
        build_image_encoder(ImageEncoderConfig(type="timm", name="resnet10t", options={"pretrained": True}))
    with pytest.raises(ConfigError, match="is not a timm model"):
        build_image_encoder(ImageEncoderConfig(type="timm", name="resnet_nope"))


# -------------------------------------------------------------------------------------------------- hf


def test_hf_local_directory_equals_transformers(tmp_path: Path) -> None:
    from transformers import AutoModel, BertConfig, BertModel
    from transformers import BertTokenizer as BertTokenizerFast  # one Rust-backed class in transformers 5

    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    directory = tmp_path / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(str(directory))
    BertTokenizerFast(vocab=str(vocab_file)).save_pretrained(str(directory))

    from vlp.data.tokenizers import build_tokenizer

    cfg = TextEncoderConfig(type="hf", name=str(directory), tokenizer="", max_length=16)
    tokenizer = build_tokenizer(cfg)
    encoder: Any = build_text_encoder(cfg, tokenizer).eval()
    reference = AutoModel.from_pretrained(str(directory), local_files_only=True).eval()
    batch = tokenizer(CAPTIONS, 16)
    with torch.no_grad():
        out = encoder(**batch)
        expected = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
    torch.testing.assert_close(out.tokens, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, expected.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)
    assert encoder.bidirectional and encoder.width == encoder.embed_dim == 32
    assert encoder.model.pooler is None and encoder.vocab_size == tokenizer.vocab_size == len(WORDS) + 5
    assert encoder.embeddings is encoder.model.embeddings.word_embeddings
    with pytest.raises(UserError, match="not a local model directory"):
        build_text_encoder(TextEncoderConfig(type="hf", name="bert-base-uncased"), tokenizer)
    # rebuilt offline from its config (name empty, options = the model's config) it is the same model
    rebuilt: Any = build_text_encoder(TextEncoderConfig(type="hf", max_length=16,
                                                        options=encoder.model.config.to_dict()), tokenizer)
    rebuilt.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch).tokens, out.tokens, atol=0, rtol=0)


def test_open_clip_presets_with_overrides(tokenizer: Tokenizer) -> None:
    image: Any = build_image_encoder(ImageEncoderConfig(type="open_clip", name="ViT-B/32", image_size=64,
                                                        options={"layers": 1, "width": 64, "head_width": 32}))
    assert image.visual.patch_size == (32, 32) and image.embed_dim == 512  # from the preset
    assert image(torch.randn(1, 3, 64, 64)).tokens.shape == (1, 5, 64)
    clip = clip_tokenizer()
    small = {"layers": 1, "width": 32, "heads": 2}
    text: Any = build_text_encoder(TextEncoderConfig(type="open_clip", name="ViT-B-32", tokenizer="clip",
                                                     max_length=77, options=small), clip)
    assert text.vocab_size == 49408 and text.text.context_length == 77 and text.embed_dim == 512
    assert text(**clip(["a cat"], 77)).pooled.shape == (1, 512)
    with pytest.raises(ConfigError, match="exceeds the open_clip context length 77"):
        build_text_encoder(TextEncoderConfig(type="open_clip", name="ViT-B-32", max_length=80, options=small), clip)


def test_open_clip_text_pools_at_the_closing_token(tokenizer: Tokenizer) -> None:
    # a word-level tokenizer's [SEP] is not its largest id, so the tower pools by eos instead of argmax
    encoder: Any = build_text_encoder(TEXT_CONFIGS["open_clip"], tokenizer).eval()
    sep = tokenizer.backend.token_to_id("[SEP]")
    assert encoder.text.pool_type == "eos" and encoder.text.eos_id == sep
    batch = tokenizer(CAPTIONS, 16)
    with torch.no_grad():
        out = encoder(**batch)
    last = batch["attention_mask"].sum(1) - 1
    assert batch["input_ids"][torch.arange(3), last].tolist() == [sep] * 3
    torch.testing.assert_close(out.tokens[torch.arange(3), last] @ encoder.text.text_projection, out.pooled)


def test_vit_conv_stem_is_timms_conv_stem_with_the_patch_grid() -> None:
    from timm.models.vision_transformer_hybrid import ConvStem

    cfg = ImageEncoderConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, patch_embed="conv_stem")
    encoder = build_image_encoder(cfg)
    reference = ConvStem(3, depth=3, channels=(8, 16, 32), stride=(2, 2, 2))
    reference.load_state_dict(encoder.patch_embed.state_dict())  # same layout, same keys
    images = torch.randn(4, 3, 32, 32)
    encoder.eval(), reference.eval()
    torch.testing.assert_close(encoder.patch_embed(images), reference(images), rtol=0, atol=0)
    assert encoder(images).tokens.shape == (4, 1 + 16, 32)  # the grid of patch_size 8
    convs = [m for m in encoder.patch_embed.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.stride, c.kernel_size) for c in convs] == [(8, (2, 2), (3, 3)), (16, (2, 2), (3, 3)),
                                                                            (32, (2, 2), (3, 3))]
    encoder.train()
    _image_loss(encoder, images).backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)


@pytest.mark.parametrize(("changes", "message"), [
    ({"patch_size": 6, "image_size": 36}, r"model\.image\.patch_size.*power of 2"),
    ({"patch_size": 2}, r"model\.image\.patch_size.*power of 2"),
    ({"width": 34, "num_heads": 2}, r"model\.image\.width.*divisible by patch_size / 2 = 4"),
    ({"patch_embed": "convs"}, r"model\.image\.patch_embed"),
    ({"type": "timm", "name": "vit_tiny_patch16_224"}, r"model\.image\.patch_embed.*native vit"),
])
def test_vit_conv_stem_config_errors_name_the_key(changes: dict[str, Any], message: str) -> None:
    from vlp.config.schema import ModelConfig
    from vlp.config.validate import validate_model_config

    image = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "num_heads": 2, "patch_embed": "conv_stem"}
    with pytest.raises(ConfigError, match=message):
        validate_model_config(ModelConfig(image=ImageEncoderConfig(**{**image, **changes})))


def _small_shapes(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32 images holding one 5-pixel square (label 0) or plus sign (1), placed anywhere: smaller than a patch."""
    images = torch.zeros(count, 3, 32, 32)
    labels = torch.randint(0, 2, (count,), generator=generator)
    corners = torch.randint(0, 27, (count, 2), generator=generator).tolist()
    for image, label, (y, x) in zip(images, labels.tolist(), corners):
        if label == 0:
            image[:, y:y + 5, x:x + 5] = 1.0
        else:
            image[:, y + 2, x:x + 5] = 1.0
            image[:, y:y + 5, x + 2] = 1.0
    return images, labels


def test_vit_conv_stem_learns_shapes_smaller_than_a_patch() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    cfg = ImageEncoderConfig(image_size=32, patch_size=8, width=32, depth=1, num_heads=2, patch_embed="conv_stem")
    encoder = build_image_encoder(cfg)
    head = nn.Linear(32, 2)
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=2e-3)
    for _ in range(150):
        images, labels = _small_shapes(32, generator)
        loss = F.cross_entropy(head(encoder(images).pooled), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    encoder.eval()
    images, labels = _small_shapes(400, generator)
    with torch.no_grad():
        accuracy = (head(encoder(images).pooled).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9  # chance 0.5
