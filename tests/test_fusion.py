"""vlp.fusion: padding invariance, attention weights, Hugging Face BertLayer / ViltLayer equivalence,
gradient flow, cached image keys/values, grad checkpointing, registry builders."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fusion_cases import (
    BLOCK_NAMES,
    DIM,
    HEADS,
    IMAGE_LEN,
    TEXT_LEN,
    B,
    _block,
    _blocks,
    _inputs,
    _randomize,
)
from torch import Tensor, nn
from transformers import BertConfig, ViltConfig
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.vilt.modeling_vilt import ViltLayer, ViltPooler

from vlp.config.schema import FusionConfig
from vlp.errors import ConfigError
from vlp.fusion import DualStreamFusion, SingleStreamFusion, build_fusion
from vlp.layers import TransformerBlock
from vlp.registry import fusions
from vlp.types import FusionOutput


def _pad(tokens: Tensor, mask: Tensor, extra: int) -> tuple[Tensor, Tensor]:
    garbage = 100.0 * torch.randn(tokens.shape[0], extra, tokens.shape[2])
    return torch.cat([tokens, garbage], 1), torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], 1)


def _assert_real_close(actual: Tensor, expected: Tensor, mask: Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual[mask], expected[mask], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_padding_does_not_change_real_positions(name: str) -> None:
    block = _block(name)
    text, image, text_mask, image_mask = _inputs()
    with torch.no_grad():
        base = block(text, image, text_mask, image_mask)
        # Overwrite already-padded positions with garbage too: they must be ignored, not just zero.
        noisy_text = torch.where(text_mask[..., None], text, 1e3 * torch.randn_like(text))
        noisy_image = torch.where(image_mask[..., None], image, 1e3 * torch.randn_like(image))
        padded_text, padded_text_mask = _pad(noisy_text, text_mask, 4)
        padded_image, padded_image_mask = _pad(noisy_image, image_mask, 3)
        padded = block(padded_text, padded_image, padded_text_mask, padded_image_mask)
    assert padded.text.shape == (B, TEXT_LEN + 4, DIM) and padded.image.shape == (B, IMAGE_LEN + 3, DIM)
    _assert_real_close(padded.text[:, :TEXT_LEN], base.text, text_mask)
    _assert_real_close(padded.image[:, :IMAGE_LEN], base.image, image_mask)
    torch.testing.assert_close(padded.pooled, base.pooled, atol=1e-5, rtol=1e-5)
    assert base.pooled.shape == (B, block.out_dim)


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_no_mask_equals_all_true_mask_and_long_mask_equals_bool(name: str) -> None:
    block = _block(name)
    text, image, text_mask, image_mask = _inputs()
    all_text, all_image = torch.ones(B, TEXT_LEN, dtype=torch.bool), torch.ones(B, IMAGE_LEN, dtype=torch.bool)
    with torch.no_grad():
        unmasked, explicit = block(text, image), block(text, image, all_text, all_image)
        only_text = block(text, image, text_mask)
        long_mask = block(text, image, text_mask.long(), image_mask.long())
        bool_mask = block(text, image, text_mask, image_mask)
    torch.testing.assert_close(unmasked.pooled, explicit.pooled, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(unmasked.text, explicit.text, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(only_text.pooled, block(text, image, text_mask, all_image).pooled, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(long_mask.text, bool_mask.text)
    # The mask really matters: ignoring it changes the pooled output.
    assert (unmasked.pooled - bool_mask.pooled).abs().max() > 1e-3


EXPECTED_KEYS = {
    "single_stream": {"self"},
    "co_attention": {"text_self", "text_to_image", "image_self", "image_to_text"},
    "one_way": {"text_self", "text_to_image"},
}


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_return_attention_equals_sdpa_path(name: str) -> None:
    block = _block(name)
    text, image, text_mask, image_mask = _inputs()
    with torch.no_grad():
        fast = block(text, image, text_mask, image_mask)
        explicit = block(text, image, text_mask, image_mask, return_attention=True)
    assert fast.attentions is None and explicit.attentions is not None
    torch.testing.assert_close(explicit.text, fast.text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit.image, fast.image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit.pooled, fast.pooled, atol=1e-5, rtol=1e-5)
    assert len(explicit.attentions) == 2
    joint_mask = torch.cat([text_mask, image_mask], 1)
    key_masks = {"self": joint_mask, "text_self": text_mask, "text_to_image": image_mask,
                 "image_self": image_mask, "image_to_text": text_mask}
    for layer in explicit.attentions:
        assert set(layer) == EXPECTED_KEYS[name]
        for kind, weights in layer.items():
            key_mask = key_masks[kind]
            assert weights.shape[:2] == (B, HEADS) and weights.shape[-1] == key_mask.shape[1]
            torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
            padded_keys = ~key_mask[:, None, None, :].expand_as(weights)
            assert weights[padded_keys].abs().max() == 0


def _copy_linear(target: nn.Linear, source: nn.Linear) -> None:
    target.weight.data.copy_(source.weight.data)
    target.bias.data.copy_(source.bias.data)


def _copy_norm(target: nn.LayerNorm, source: nn.Module) -> None:
    assert isinstance(source, nn.LayerNorm) and target.eps == source.eps == 1e-12
    target.weight.data.copy_(source.weight.data)
    target.bias.data.copy_(source.bias.data)


def _extended_mask(mask: Tensor) -> Tensor:
    """HF's additive attention mask [b, 1, 1, m]: 0 for real keys, dtype min for padding."""
    return (~mask[:, None, None, :]).float() * torch.finfo(torch.float32).min


def _hf_bert_layer(ours: nn.Module) -> BertLayer:
    """A Hugging Face BertLayer with cross-attention holding ``ours``'s weights."""
    assert isinstance(ours, TransformerBlock) and ours.cross_attn is not None and ours.norm_cross is not None
    settings: dict[str, Any] = dict(
        hidden_size=DIM, num_attention_heads=HEADS, intermediate_size=4 * DIM, hidden_act="gelu",
        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        is_decoder=True, add_cross_attention=True, attn_implementation="eager",
    )
    reference = BertLayer(BertConfig(**settings)).eval()
    for hf_attention, attn, norm in [(reference.attention, ours.attn, ours.norm1),
                                     (reference.crossattention, ours.cross_attn, ours.norm_cross)]:
        _copy_linear(hf_attention.self.query, attn.q)
        _copy_linear(hf_attention.self.key, attn.k)
        _copy_linear(hf_attention.self.value, attn.v)
        _copy_linear(hf_attention.output.dense, attn.proj)
        _copy_norm(hf_attention.output.LayerNorm, norm)
    _copy_linear(reference.intermediate.dense, ours.mlp.fc1)
    _copy_linear(reference.output.dense, ours.mlp.fc2)
    _copy_norm(reference.output.LayerNorm, ours.norm2)
    return reference


def _run_hf(layer: BertLayer, tokens: Tensor, mask: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
    # An explicit (padding) mask also keeps HF's decoder self-attention bidirectional.
    out = layer(tokens, attention_mask=_extended_mask(mask), encoder_hidden_states=context,
                encoder_attention_mask=_extended_mask(context_mask))
    return out[0] if isinstance(out, tuple) else out


def test_one_way_layer_equals_hf_bert_layer_with_cross_attention() -> None:
    torch.manual_seed(0)
    fusion = DualStreamFusion(DIM, 1, HEADS, mlp_ratio=4.0, update_image=False).eval()
    _randomize(fusion)
    reference = _hf_bert_layer(fusion.text_layers[0])
    text, image, text_mask, image_mask = _inputs()
    with torch.no_grad():
        expected = _run_hf(reference, text, text_mask, image, image_mask)
        out = fusion(text, image, text_mask, image_mask)
    torch.testing.assert_close(out.text, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, expected[:, 0], atol=1e-5, rtol=1e-5)
    assert torch.equal(out.image, image)


def test_co_attention_equals_hf_bert_layers_reading_previous_states() -> None:
    torch.manual_seed(0)
    fusion = DualStreamFusion(DIM, 2, HEADS, mlp_ratio=4.0, update_image=True).eval()
    _randomize(fusion)
    assert fusion.text_pooler is not None and fusion.image_pooler is not None
    text_layers = [_hf_bert_layer(layer) for layer in fusion.text_layers]
    image_layers = [_hf_bert_layer(layer) for layer in fusion.image_layers]
    text, image, text_mask, image_mask = _inputs()
    with torch.no_grad():
        expected_text, expected_image = text, image
        for text_layer, image_layer in zip(text_layers, image_layers):
            expected_text, expected_image = (
                _run_hf(text_layer, expected_text, text_mask, expected_image, image_mask),
                _run_hf(image_layer, expected_image, image_mask, expected_text, text_mask),
            )
        expected_pooled = torch.cat([torch.tanh(fusion.text_pooler(expected_text[:, 0])),
                                     torch.tanh(fusion.image_pooler(expected_image[:, 0]))], -1)
        out = fusion(text, image, text_mask, image_mask)
    torch.testing.assert_close(out.text, expected_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image, expected_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, expected_pooled, atol=1e-5, rtol=1e-5)


def test_single_stream_layer_equals_hf_vilt_layer() -> None:
    torch.manual_seed(0)
    fusion = SingleStreamFusion(DIM, 1, HEADS, mlp_ratio=4.0).eval()
    _randomize(fusion)
    config = ViltConfig(hidden_size=DIM, num_attention_heads=HEADS, intermediate_size=4 * DIM, hidden_act="gelu",
                        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True)
    reference, pooler = ViltLayer(config).eval(), ViltPooler(config).eval()
    block = fusion.blocks[0]
    assert isinstance(block, TransformerBlock)
    _copy_linear(reference.attention.attention.query, block.attn.q)
    _copy_linear(reference.attention.attention.key, block.attn.k)
    _copy_linear(reference.attention.attention.value, block.attn.v)
    _copy_linear(reference.attention.output.dense, block.attn.proj)
    _copy_norm(reference.layernorm_before, block.norm1)
    _copy_norm(reference.layernorm_after, block.norm2)
    _copy_linear(reference.intermediate.dense, block.mlp.fc1)
    _copy_linear(reference.output.dense, block.mlp.fc2)
    _copy_linear(pooler.dense, fusion.pooler)

    text, image, text_mask, image_mask = _inputs()
    with torch.no_grad():
        # ViLT's token-type embeddings: text type 0, image type 1, added before concatenation.
        types = fusion.modality_type.weight
        joint = torch.cat([text + types[0], image + types[1]], 1)
        hidden = reference(joint, attention_mask=_extended_mask(torch.cat([text_mask, image_mask], 1)))[0]
        hidden = fusion.norm(hidden)
        out = fusion(text, image, text_mask, image_mask)
    torch.testing.assert_close(out.text, hidden[:, :TEXT_LEN], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image, hidden[:, TEXT_LEN:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, pooler(hidden), atol=1e-5, rtol=1e-5)


def _loss(out: FusionOutput, seed: int = 2) -> Tensor:
    # Random projections: a plain sum would give zero gradient through LayerNorm outputs.
    gen = torch.Generator().manual_seed(seed)
    parts = (out.text, out.image, out.pooled)
    return torch.stack([(part * torch.randn(part.shape, generator=gen)).sum() for part in parts]).sum()


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_gradients_reach_every_parameter(name: str) -> None:
    block = _block(name).train()
    text, image, text_mask, image_mask = _inputs()
    text.requires_grad_(True)
    _loss(block(text, image, text_mask, image_mask)).backward()
    for param_name, param in block.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, param_name
    assert text.grad is not None and text.grad.abs().max() > 0


@pytest.mark.parametrize("name", BLOCK_NAMES)
def test_grad_checkpointing_gives_same_gradients(name: str) -> None:
    block = _block(name).train()
    text, image, text_mask, image_mask = _inputs()
    calls: list[int] = []
    # A pre-hook on the first sub-module: non-reentrant checkpointing stops recomputing once the saved
    # tensors are restored, so hooks on later sub-modules may not fire.
    for sub in block.modules():
        if isinstance(sub, TransformerBlock):
            sub.attn.register_forward_pre_hook(lambda *args: calls.append(1))

    def grads() -> dict[str, Tensor]:
        block.zero_grad()
        _loss(block(text, image, text_mask, image_mask)).backward()
        return {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}

    plain = grads()
    forward_calls = len(calls)
    block.set_grad_checkpointing(True)
    checkpointed = grads()
    assert len(calls) == 3 * forward_calls  # every layer recomputed once in backward
    assert plain.keys() == checkpointed.keys() == {n for n, _ in block.named_parameters()}
    for param_name in plain:
        torch.testing.assert_close(checkpointed[param_name], plain[param_name], atol=1e-5, rtol=1e-5)
    block.set_grad_checkpointing(False)
    grads()
    assert len(calls) == 4 * forward_calls


def test_image_kv_cache_equals_recomputation_and_indexes_per_candidate() -> None:
    block = _block("one_way")
    co_attention = _block("co_attention")
    assert isinstance(block, DualStreamFusion) and isinstance(co_attention, DualStreamFusion)
    text, image, text_mask, image_mask = _inputs()
    with torch.no_grad():
        kv = block.image_kv(image)
        assert len(kv) == 2 and kv[0][0].shape == (B, HEADS, IMAGE_LEN, DIM // HEADS)
        plain = block(text, image, text_mask, image_mask)
        cached = block(text, image, text_mask, image_mask, image_kv=kv)
        torch.testing.assert_close(cached.text, plain.text)
        torch.testing.assert_close(cached.pooled, plain.pooled)
        # Re-ranking: each text row paired with a chosen image, keys/values indexed instead of recomputed.
        index = torch.tensor([2, 0, 2])
        picked = [(keys[index], values[index]) for keys, values in kv]
        expected = block(text, image[index], text_mask, image_mask[index])
        reused = block(text, image[index], text_mask, image_mask[index], image_kv=picked)
        torch.testing.assert_close(reused.pooled, expected.pooled)
        explained = block(text, image[index], text_mask, image_mask[index], image_kv=picked, return_attention=True)
        torch.testing.assert_close(explained.pooled, expected.pooled, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="entries"):
        block(text, image, image_kv=kv[:1])
    with pytest.raises(ValueError, match="update_image=False"):
        co_attention.image_kv(image)


def test_bad_shapes_raise_clear_errors() -> None:
    block = _block("single_stream")
    text, image, text_mask, _ = _inputs()
    with pytest.raises(ValueError, match="fusion width is 32"):
        block(text, torch.randn(B, IMAGE_LEN, 16))
    with pytest.raises(ValueError, match="batch"):
        block(text, image[:2])
    with pytest.raises(ValueError, match="text_mask"):
        block(text, image, text_mask[:, :3])


def test_out_dims() -> None:
    blocks = _blocks()
    assert blocks["single_stream"].out_dim == DIM
    assert blocks["co_attention"].out_dim == 2 * DIM
    assert blocks["one_way"].out_dim == DIM


def _configs() -> list[FusionConfig]:
    configs = []
    for name in fusions.names():
        for update_image in ((False, True) if name == "dual_stream" else (False,)):
            configs.append(FusionConfig(type=name, depth=1, num_heads=4, mlp_ratio=2.0, update_image=update_image))
    return configs


@pytest.mark.parametrize("cfg", _configs(), ids=lambda c: f"{c.type}-{c.update_image}")
def test_every_registered_fusion_builds_and_trains(cfg: FusionConfig) -> None:
    torch.manual_seed(0)
    module = build_fusion(cfg, DIM)
    assert fusions.get(cfg.type) is not None
    if cfg.type == "none":
        assert module is None
        return
    assert isinstance(module, nn.Module)
    assert len(list(module.modules())) > 1 and sum(1 for m in module.modules() if isinstance(m, TransformerBlock)) >= 1
    text, image, text_mask, image_mask = _inputs()
    out = module(text, image, text_mask, image_mask)
    assert out.pooled.shape == (B, module.out_dim) and torch.isfinite(out.pooled).all()
    _loss(out).backward()
    assert all(p.grad is not None for p in module.parameters())


def test_registry_has_the_design_names_and_build_errors_name_the_key() -> None:
    assert set(fusions.names()) >= {"none", "single_stream", "dual_stream"}
    with pytest.raises(ConfigError, match="model.fusion.type.*did you mean 'dual_stream'"):
        build_fusion(FusionConfig(type="dual_strem"), DIM)
    with pytest.raises(ConfigError, match="model.fusion.num_heads"):
        build_fusion(FusionConfig(type="single_stream", depth=1, num_heads=5), DIM)
    cfg = FusionConfig(type="dual_stream", depth=3, num_heads=4, update_image=True)
    built = build_fusion(cfg, DIM)
    assert isinstance(built, DualStreamFusion) and built.update_image and len(built.text_layers) == 3


def test_default_init_is_xavier_and_bert_stays_one_key_away() -> None:
    import math

    torch.manual_seed(0)
    block = DualStreamFusion(256, 1, 4, update_image=True)
    layer = block.text_layers[0]
    assert isinstance(layer, TransformerBlock)
    # Xavier-uniform: std sqrt(2 / (fan_in + fan_out))
    assert abs(layer.mlp.fc1.weight.std().item() - math.sqrt(2 / (256 + 1024))) < 0.003
    assert abs(layer.attn.proj.weight.std().item() - math.sqrt(2 / 512)) < 0.003
    assert layer.mlp.fc1.bias.abs().max() == 0
    assert torch.equal(layer.norm1.weight, torch.ones(256)) and layer.norm1.eps == 1e-12
    single = SingleStreamFusion(256, 1, 4)
    assert abs(single.modality_type.weight.std().item() - 0.02) < 0.002  # embeddings keep BERT's std
    bert = DualStreamFusion(256, 1, 4, update_image=True, init="bert")
    assert abs(bert.text_layers[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    assert build_fusion(FusionConfig(type="dual_stream", depth=1, num_heads=4, init="bert"), DIM).text_layers[0] \
        .mlp.fc1.weight.std().item() < 0.025
    with pytest.raises(ValueError, match="unknown fusion init"):
        SingleStreamFusion(256, 1, 4, init="normal")


def test_default_init_makes_the_pooled_state_depend_on_the_image() -> None:
    """The ITM plateau's cause: under BERT's std 0.02 at a small width, swapping the image barely moves the
    [CLS] state the match head reads; Xavier gains make it move by a sizeable fraction."""
    generator = torch.Generator().manual_seed(0)
    text, image = torch.randn(8, 12, 128, generator=generator), torch.randn(8, 17, 128, generator=generator)
    text, image = F.layer_norm(text, (128,)), F.layer_norm(image, (128,))
    moved = {}
    for init in ("xavier", "bert"):
        torch.manual_seed(0)
        block = DualStreamFusion(128, 2, 4, update_image=False, init=init)
        with torch.no_grad():
            pooled = block(text, image).pooled
            swapped = block(text, image.roll(1, dims=0)).pooled
        moved[init] = ((pooled - swapped).norm(dim=-1) / pooled.norm(dim=-1)).mean().item()
    assert moved["xavier"] > 5 * moved["bert"], moved
