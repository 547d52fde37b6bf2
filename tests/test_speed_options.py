"""The speed-only options as types: declared abilities (``computes_pooled_only``, ``shares_image_context``)
that match what each forward accepts, modules without them run in full, and ``Rows`` / ``SharedContext``."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from fusion_cases import _block, _inputs, _randomize
from torch import Tensor, nn

import vlp.encoders  # noqa: F401  (registers, and so imports, every encoder class)
from vlp.encoders import ImageEncoder, TextEncoder
from vlp.fusion import DualStreamFusion, Fusion, SingleStreamFusion
from vlp.layers import Rows, SharedContext, TransformerBlock
from vlp.models import VLPModel
from vlp.models.vlp_model import image_features_of, text_features_of
from vlp.types import EncoderOutput, FusionOutput

ROOT = Path(__file__).resolve().parents[1]


def _subclasses(base: type) -> list[type]:
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return [cls for cls in found if cls.__module__.startswith("vlp.")]


def _parameters(cls: type) -> set[str]:
    return set(inspect.signature(cls.forward).parameters)  # type: ignore[attr-defined]


@pytest.mark.parametrize("base", [ImageEncoder, TextEncoder, Fusion])
def test_declared_pooled_only_matches_what_forward_accepts(base: type) -> None:
    classes = _subclasses(base)
    assert classes
    for cls in classes:
        assert cls.computes_pooled_only == ("pooled_only" in _parameters(cls)), cls.__name__
    assert any(cls.computes_pooled_only for cls in classes)


def test_declared_shared_image_context_matches_forward_and_builds() -> None:
    one_way, co_attention = _block("one_way"), _block("co_attention")
    single = _block("single_stream")
    assert one_way.shares_image_context() and not co_attention.shares_image_context()
    assert not single.shares_image_context()
    assert {"image_kv", "image_index"} <= _parameters(DualStreamFusion)
    assert not {"image_kv", "image_index"} & _parameters(SingleStreamFusion)


def test_fusion_without_the_ability_is_refused_with_a_clear_error() -> None:
    _, image, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"SingleStreamFusion does not share image keys/values"):
        _block("single_stream").image_kv(image)
    with pytest.raises(ValueError, match="update_image=False"):
        _block("co_attention").image_kv(image)


class _PlainFusion(nn.Module):
    """A user fusion that is not a ``vlp.fusion.Fusion``: its forward takes none of the speed-only options."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.out_dim = inner.out_dim

    def forward(self, text: Tensor, image: Tensor, text_mask: Tensor | None = None,
                image_mask: Tensor | None = None, return_attention: bool = False) -> FusionOutput:
        out: FusionOutput = self.inner(text, image, text_mask, image_mask, return_attention=return_attention)
        return out


def test_model_runs_a_fusion_without_declared_abilities_in_full() -> None:
    torch.manual_seed(0)
    model = VLPModel.from_config(ROOT / "configs" / "models" / "albef_base_tiny.yaml").eval()
    size = model.image_encoder.image_size
    tokens = model.tokenizer(["a red cube", "the blue ball left of a cube", "green"], max_length=16)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        image_out, _ = model.image_features(images)
        text_out, _ = model.text_features(ids, mask)
        declared = (model.itm_logits_from(text_out, model.image_context(image_out), index),
                    model.fuse_indexed(text_out, image_out, index, pooled_only=True).pooled)
        assert model.image_context(image_out).kv is not None
        model.fusion = _PlainFusion(model.fusion)
        context = model.image_context(image_out)
        assert context.kv is None  # nothing is cached for a fusion that does not declare it
        plain = (model.itm_logits_from(text_out, context, index),
                 model.fuse_indexed(text_out, image_out, index, pooled_only=True).pooled)
        full = model.fuse(text_out, image_out.select(index), pooled_only=True)
    assert full.text.shape[1] == text_out.tokens.shape[1]  # pooled_only did not reach the plain fusion
    for fast, reference in zip(declared, plain):
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


class _MeanPatches(ImageEncoder):
    """An encoder without ``computes_pooled_only``: its forward takes images only."""

    def __init__(self) -> None:
        super().__init__()
        self.width = self.embed_dim = self.image_size = 8
        self.mean = self.std = (0.5, 0.5, 0.5)
        self.stem = nn.Conv2d(3, 8, kernel_size=4, stride=4)

    def forward(self, images: Tensor) -> EncoderOutput:
        patches = self.stem(images).flatten(2).transpose(1, 2)
        return EncoderOutput(patches, torch.ones(patches.shape[:2], dtype=torch.bool), patches.mean(dim=1))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass


def test_encode_passes_pooled_only_only_to_encoders_that_declare_it() -> None:
    images = torch.randn(2, 3, 8, 8)
    plain = _MeanPatches()
    assert plain.encode(images, pooled_only=True).tokens.shape == (2, 4, 8)
    from vlp.encoders.vit import VisionTransformer

    vit = VisionTransformer(8, 4, 16, 2, 2).eval()
    fast, full = vit.encode(images, pooled_only=True), vit.encode(images)
    assert fast.tokens.shape == (2, 1, 16) and full.tokens.shape == (2, 5, 16)
    torch.testing.assert_close(fast.pooled, full.pooled, atol=1e-5, rtol=1e-5)


def test_features_of_asks_other_models_without_pooled_only() -> None:
    class Features:
        def image_features(self, images: Tensor) -> tuple[EncoderOutput, Tensor]:
            return EncoderOutput(images[:, None], torch.ones(len(images), 1, dtype=torch.bool), images), images

        def text_features(self, ids: Tensor, mask: Tensor) -> tuple[EncoderOutput, Tensor]:
            return self.image_features(ids.float())

    model: Any = Features()
    assert image_features_of(model, torch.ones(2, 3), pooled_only=True)[1].shape == (2, 3)
    assert text_features_of(model, torch.ones(2, 3), torch.ones(2, 3), pooled_only=True)[1].shape == (2, 3)


@pytest.mark.parametrize("causal", [False, True])
def test_rows_at_index_equals_those_rows_of_the_full_forward(causal: bool) -> None:
    block = TransformerBlock(16, 4, pre_norm=causal).eval()
    _randomize(block)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 16, generator=gen)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 4, 2])[:, None]
    index = torch.tensor([5, 3, 0])
    assert Rows.first().is_first and not Rows.at(index).is_first
    assert torch.equal(Rows.first().positions(x), torch.zeros(3, dtype=torch.long))
    assert Rows.at(index).positions(x) is index
    full = block(x, mask, causal=causal)
    part = block(x, mask, causal=causal, rows=Rows.at(index))
    assert part.shape == (3, 1, 16)
    torch.testing.assert_close(part[:, 0], full[torch.arange(3), index], atol=1e-5, rtol=1e-5)


def test_shared_context_by_index_equals_per_row_contexts() -> None:
    block = TransformerBlock(16, 4, pre_norm=False, cross_attention=True, context_dim=8).eval()
    _randomize(block)
    gen = torch.Generator().manual_seed(3)
    x, contexts = torch.randn(4, 5, 16, generator=gen), torch.randn(2, 3, 8, generator=gen)
    context_mask = torch.tensor([[True, True, True], [True, False, False]])
    index = torch.tensor([1, 0, 1, 1])
    assert block.cross_attn is not None
    kv = block.cross_attn.key_value(contexts)
    per_row = block(x, context=contexts[index], context_mask=context_mask[index])
    for shared in (SharedContext(index=index), SharedContext(kv=kv, index=index)):
        out = block(x, context=contexts, context_mask=context_mask, shared=shared)
        torch.testing.assert_close(out, per_row, atol=1e-5, rtol=1e-5)
    cached = block(x, context_mask=context_mask[index], shared=SharedContext(kv=(kv[0][index], kv[1][index])))
    torch.testing.assert_close(cached, per_row, atol=1e-5, rtol=1e-5)
