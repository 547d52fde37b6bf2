from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from vlp.cli.main import main
from vlp.data.synthetic import SyntheticScenes
from vlp.explain import (
    box_ratio,
    caption_heatmap,
    explain,
    localization_ratio,
    object_caption,
    save_overlay,
    text_to_image_gradcam,
)
from vlp.models import VLPModel

ROOT = Path(__file__).resolve().parents[1]
# the module, not the function of the same name that vlp.layers re-exports
attention_module = importlib.import_module("vlp.layers.attention")
FUSED = ("albef_base_tiny", "meter_base_tiny", "vilt_base_tiny")
CAPTION = "a large red circle at the top left"


def _model(name: str, fusion_depth: int | None = None, tokenizer: str | None = None) -> VLPModel:
    data: dict[str, Any] = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "models" / f"{name}.yaml").read_text()))
    if fusion_depth is not None:
        data["model"]["fusion"]["depth"] = fusion_depth
    if tokenizer is not None:
        data["model"]["text"]["tokenizer"] = tokenizer
    torch.manual_seed(0)
    return VLPModel.from_config(data).eval()


@pytest.fixture(scope="module")
def scene_image() -> Image.Image:
    return SyntheticScenes(2, seed=0, split="test", image_size=32).render(0)


@pytest.mark.parametrize("name", FUSED)
def test_explanation_shapes_and_values(name: str, scene_image: Image.Image) -> None:
    model = _model(name, fusion_depth=2)
    result = explain(model, scene_image, CAPTION)
    assert result.layer == 0  # second-to-last of two layers
    assert result.tokens == ["[CLS]", *CAPTION.split(), "[SEP]"]
    assert result.words == CAPTION.split()
    assert result.token_maps.shape == (len(result.tokens), 4, 4)  # 32 px / 8 px patches
    assert result.heatmap.shape == (4, 4) and result.word_maps.shape == (len(result.words), 4, 4)
    assert bool((result.token_maps >= 0).all()) and float(result.heatmap.sum()) > 0
    # word tokenizer: one token per word, so each word map is its token's map; the caption map is the mean
    torch.testing.assert_close(result.word_maps, result.token_maps[1:-1])
    torch.testing.assert_close(result.heatmap, result.token_maps.mean(dim=0))
    assert 0.0 < result.itm_score < 1.0
    # a padded batch gives the same maps at real positions and zero maps at padding
    batch = model.tokenizer([CAPTION, "a circle"], model.config.text.max_length)
    pixels = model.image_transform()(scene_image)[None].repeat(2, 1, 1, 1)
    maps, logits = text_to_image_gradcam(model, pixels, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(maps[0], result.token_maps, rtol=1e-4, atol=1e-9)
    assert float(maps[1, 4:].abs().sum()) == 0.0 and logits.shape == (2, 2)


def _hand_gradcam(model: VLPModel, image: Image.Image, text: str, layer: int) -> torch.Tensor:
    """ALBEF's notebook recipe: keep the attention tensor's gradient, then attention * relu(gradient)."""
    batch = model.tokenizer([text], model.config.text.max_length)
    image_out = model.image_encoder(model.image_transform()(image)[None])
    text_out = model.text_encoder(batch["input_ids"], batch["attention_mask"])
    fused = model.fuse(text_out, image_out, return_attention=True)
    assert fused.attentions is not None
    weights = fused.attentions[layer]
    attention = weights["text_to_image"] if "text_to_image" in weights else weights["self"]
    attention.retain_grad()
    model.zero_grad()
    model.itm_scores(fused)[:, 1].sum().backward()
    assert attention.grad is not None
    num_text = batch["input_ids"].shape[1]
    if "self" in weights and "text_to_image" not in weights:  # joint [text; image] sequence
        att, grad = attention[0, :, :num_text, num_text:], attention.grad[0, :, :num_text, num_text:]
    else:
        att, grad = attention[0], attention.grad[0]
    heads = [att[h, :, 1:] * grad[h, :, 1:].clamp(min=0) for h in range(att.shape[0])]  # drop the image CLS
    return (torch.stack(heads).sum(dim=0) / len(heads)).detach().reshape(num_text, 4, 4)


@pytest.mark.parametrize("name", FUSED)
def test_gradcam_equals_hand_computation_per_layer(name: str, scene_image: Image.Image) -> None:
    model = _model(name, fusion_depth=2)
    for layer in (0, 1):
        expected = _hand_gradcam(model, scene_image, CAPTION, layer)
        result = explain(model, scene_image, CAPTION, layer=layer)
        assert result.layer == layer
        torch.testing.assert_close(result.token_maps, expected, rtol=1e-4, atol=1e-10)
    # the last layer reaches the match score only through the [CLS] row; the words get no gradient there
    last = explain(model, scene_image, CAPTION, layer=-1)
    assert float(last.token_maps[0].sum()) > 0 and float(last.token_maps[1:].abs().sum()) == 0.0


def test_explain_leaves_no_parameter_gradients(scene_image: Image.Image) -> None:
    model = _model("albef_base_tiny")
    model.requires_grad_(False)  # frozen weights still give maps: the graph hangs off the input pixels
    result = explain(model, scene_image, CAPTION)
    assert float(result.heatmap.sum()) > 0
    assert all(p.grad is None for p in model.parameters())


TARGET = (1, 3)  # patch row 1, column 3 of the 4 x 4 grid: asymmetric, so a transposed layout fails


def _force_attention(monkeypatch: pytest.MonkeyPatch, num_keys: int, target_key: int) -> None:
    """Every attention call over ``num_keys`` keys puts almost all of its weight on ``target_key``."""
    original = attention_module.attention

    def forced(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
               causal: bool = False, dropout: float = 0.0, return_weights: bool = False) -> Any:
        if k.shape[-2] != num_keys:
            return original(q, k, v, key_mask, causal, dropout, return_weights)
        scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5
        bias = torch.zeros(num_keys)
        bias[target_key] = 12.0
        weights = (scores + bias).softmax(dim=-1)
        return torch.einsum("bhnm,bhmd->bhnd", weights, v), weights if return_weights else None

    monkeypatch.setattr(attention_module, "attention", forced)


@pytest.mark.parametrize("name", FUSED)
def test_heatmap_peaks_where_attention_is_forced(name: str, scene_image: Image.Image,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(name, fusion_depth=1)
    num_text = len(CAPTION.split()) + 2
    patch = 1 + TARGET[0] * 4 + TARGET[1]  # after the image [CLS] token
    single = name.startswith("vilt")
    _force_attention(monkeypatch, num_text + 17 if single else 17, num_text + patch if single else patch)
    result = explain(model, scene_image, CAPTION)
    if float(result.heatmap[TARGET]) == 0.0:
        # the attended patch lowered the match score (negative gradient): flip the match logit's sign
        with torch.no_grad():
            model.itm_head.classifier.weight[1].neg_()  # type: ignore[union-attr]
            model.itm_head.classifier.bias[1].neg_()  # type: ignore[union-attr]
        result = explain(model, scene_image, CAPTION)
    peak = divmod(int(result.heatmap.argmax()), 4)
    assert peak == TARGET
    assert float(result.heatmap[TARGET]) > 0.9 * float(result.heatmap.sum())


def test_words_merge_subword_tokens(scene_image: Image.Image) -> None:
    model = _model("albef_base_tiny", fusion_depth=2, tokenizer="clip")
    text = "a reddish rhombus, unmistakably"
    result = explain(model, scene_image, text)
    assert result.words == ["a", "reddish", "rhombus", ",", "unmistakably"]
    assert len(result.tokens) > len(result.words) + 2  # BPE splits the rare words
    # "unmistakably" is the BPE pieces just before <end_of_text>: its map is their mean
    end = len(result.tokens) - 1
    start = next(k for k in range(end) if "".join(result.tokens[k:end]) == "unmistakably</w>")
    assert end - start >= 2
    torch.testing.assert_close(result.word_maps[-1], result.token_maps[start:end].mean(dim=0))


def test_box_ratio_and_caption_heatmap() -> None:
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0  # all heat in the top-left 8 x 8 px patch of a 32 px image
    assert box_ratio(heat, (0, 0, 8, 8), 32) == pytest.approx(16.0)  # 1 / (64 / 1024)
    assert box_ratio(heat, (0, 0, 4, 8), 32) == pytest.approx(0.5 / (32 / 1024))
    assert box_ratio(torch.ones(4, 4), (3, 5, 17, 20), 32) == pytest.approx(1.0)
    assert box_ratio(torch.zeros(4, 4), (0, 0, 8, 8), 32) == 0.0
    maps = torch.rand(2, 3, 4, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.testing.assert_close(caption_heatmap(maps, mask), torch.stack([maps[0, :2].mean(0), maps[1].mean(0)]))


def test_localization_ratio_runs_on_synthetic_scenes() -> None:
    model = _model("albef_base_tiny", fusion_depth=2)
    scenes = SyntheticScenes(3, seed=0, split="test", image_size=32)
    assert object_caption(scenes.objects(0)[0]) in scenes.description(0)
    ratio = localization_ratio(model, scenes, n_images=3, batch_size=2)
    objects = [(i, o) for i in range(3) for o in scenes.objects(i)]
    expected = []
    for index, obj in objects:
        result = explain(model, scenes.render(index), object_caption(obj))
        expected.append(box_ratio(result.heatmap, obj.box, 32))
    assert ratio == pytest.approx(sum(expected) / len(expected), rel=1e-4)


def test_cli_explain_writes_png(tmp_path: Path, scene_image: Image.Image, capsys: pytest.CaptureFixture[str]) -> None:
    _model("albef_base_tiny", fusion_depth=2).save_pretrained(tmp_path / "ckpt")
    scene_image.save(tmp_path / "scene.png")
    out = tmp_path / "out" / "map.png"
    code = main(["explain", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "scene.png"),
                 "--text", CAPTION, "--out", str(out)])
    assert code == 0 and str(out) in capsys.readouterr().out
    with Image.open(out) as png:
        png.load()
        assert png.size[0] > 400 and png.size[1] > 300
    direct = tmp_path / "direct.png"
    save_overlay(scene_image, explain(_model("vilt_base_tiny"), scene_image, CAPTION), direct, words=False)
    with Image.open(direct) as png:
        assert png.size[0] > 200


def test_cli_explain_errors(tmp_path: Path, scene_image: Image.Image, capsys: pytest.CaptureFixture[str]) -> None:
    _model("clip_base_tiny").save_pretrained(tmp_path / "clip")
    scene_image.save(tmp_path / "scene.png")
    base = ["explain", "--image", str(tmp_path / "scene.png"), "--text", CAPTION, "--out", str(tmp_path / "o.png")]
    assert main([*base, "--checkpoint", str(tmp_path / "clip")]) == 2
    assert "dual encoder" in capsys.readouterr().err
    assert main([*base, "--checkpoint", str(tmp_path / "missing")]) == 2
    assert "directory not found" in capsys.readouterr().err
    _model("albef_base_tiny").save_pretrained(tmp_path / "albef")
    assert main(["explain", "--checkpoint", str(tmp_path / "albef"), "--image", str(tmp_path / "nope.png"),
                 "--text", CAPTION]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(tmp_path / "albef"), "--image", str(tmp_path / "scene.png"),
                 "--text", CAPTION, "--layer", "5"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


DEMO = ROOT / "runs" / "demo" / "final"


@pytest.mark.slow
@pytest.mark.skipif(not DEMO.is_dir(), reason="needs the demo checkpoint (make demo)")
def test_demo_heatmaps_localize_the_named_object() -> None:
    model = VLPModel.from_pretrained(DEMO)
    scenes = SyntheticScenes(200, seed=0, split="test", image_size=model.image_encoder.image_size)
    assert localization_ratio(model, scenes, n_images=200) >= 2.0
