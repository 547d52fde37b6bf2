from __future__ import annotations

from pathlib import Path

import pytest
import torch

import vlp
from vlp.config import ObjectiveConfig
from vlp.models import VLPModel
from vlp.objectives import PretrainObjective

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted((ROOT / "configs" / "models").glob("*_tiny.yaml"))


def _batch(model: VLPModel, n: int = 4) -> dict[str, torch.Tensor]:
    size = model.image_encoder.image_size
    captions = ["a red circle at the top left", "a blue square in the center", "a green triangle at the bottom",
                "two shapes: a red square at the left and a blue circle at the right"][:n]
    tokens = model.tokenizer(captions, max_length=model.config.text.max_length)
    return {"images": torch.randn(n, 3, size, size), "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"], "image_ids": torch.arange(n)}


@pytest.mark.parametrize("path", TINY, ids=[p.stem for p in TINY])
def test_every_tiny_preset_trains_and_gradients_reach_every_parameter(path: Path) -> None:
    torch.manual_seed(0)
    model = VLPModel.from_config(path)
    mlm = model.mlm_head is not None
    objective = PretrainObjective(model, ObjectiveConfig(itm_weight=1.0 if model.itm_head else 0.0,
                                                         mlm_weight=1.0 if mlm else 0.0))
    out = objective.training_step(_batch(model))
    assert torch.isfinite(out.total)
    assert "itc" in out.terms and ("itm" in out.terms) == (model.itm_head is not None)
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    zero = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is not None
            and not bool(p.grad.abs().sum() > 0)]
    assert not zero, f"zero gradient at {zero}"


@pytest.mark.parametrize("path", TINY, ids=[p.stem for p in TINY])
def test_embeddings_are_normalized_fp32(path: Path) -> None:
    model = VLPModel.from_config(path).eval()
    batch = _batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = model.encode_image(batch["images"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert image.dtype == torch.float32 and text.dtype == torch.float32
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", TINY, ids=[p.stem for p in TINY])
def test_save_load_round_trip_gives_identical_outputs(path: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VLPModel.from_config(path).eval()
    batch = _batch(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded, tokenizer, transform = vlp.load(tmp_path / "ckpt")
    ids = tokenizer(["a red circle at the top left"], max_length=30)["input_ids"]
    torch.testing.assert_close(ids, model.tokenizer(["a red circle at the top left"], max_length=30)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(batch["images"]), model.encode_image(batch["images"]),
                                   atol=0, rtol=0)
        torch.testing.assert_close(loaded.encode_text(batch["input_ids"], batch["attention_mask"]),
                                   model.encode_text(batch["input_ids"], batch["attention_mask"]), atol=0, rtol=0)
        if model.itm_head is not None:
            args = (batch["images"], batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(loaded.itm_logits(*args), model.itm_logits(*args), atol=0, rtol=0)
    assert transform is not None


def test_strict_loading_names_missing_keys(tmp_path: Path) -> None:
    import safetensors.torch

    model = VLPModel.from_config(ROOT / "configs/models/albef_base_tiny.yaml")
    model.save_pretrained(tmp_path / "ckpt")
    weights = safetensors.torch.load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    weights.pop("itm_head.classifier.weight")
    safetensors.torch.save_file(weights, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(vlp.errors.UserError, match="itm_head.classifier.weight"):
        VLPModel.from_pretrained(tmp_path / "ckpt")


def test_from_config_accepts_full_run_yaml() -> None:
    model = VLPModel.from_config(ROOT / "configs/pretrain/demo_tiny.yaml")
    assert model.config.name == "albef_base_tiny"


def test_image_context_rerank_equals_direct_itm() -> None:
    torch.manual_seed(0)
    for name in ("albef_base_tiny", "meter_base_tiny", "vilt_base_tiny"):
        model = VLPModel.from_config(ROOT / f"configs/models/{name}.yaml").eval()
        batch = _batch(model)
        with torch.no_grad():
            image_out = model.image_encoder(batch["images"])
            text_out = model.text_encoder(batch["input_ids"], batch["attention_mask"])
            context = model.image_context(image_out)
            index = torch.tensor([3, 0, 2, 1])
            via_context = model.itm_logits_from(text_out, context, index)
            direct = model.itm_logits(batch["images"][index], batch["input_ids"], batch["attention_mask"])
        torch.testing.assert_close(via_context, direct, atol=1e-5, rtol=1e-5)
