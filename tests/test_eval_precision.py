"""Evaluation precision: vlp's AMX detection (both branches on every machine), what ``auto`` resolves to,
the one default of every evaluation entry point, and bf16 against fp32 on each evaluation path.

Tolerances of the bf16 comparisons (absolute, on a tiny perturbed ALBEF-style model): ITC cosine scores
within ``ITC_TOLERANCE`` = 0.02, ITM and VQA logits within ``LOGIT_TOLERANCE`` = 0.05. bf16 keeps 8
significant bits (rounding error 2^-9 of a value), which a few transformer layers grow to about 1% of the
activations; measured differences here are at most 0.005 (cosines) and 0.012 (logits of magnitude < 1).
Scores are compared, not recall@K or accuracy, where near-ties flip under any rounding.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vlp.config import load_config
from vlp.config.schema import EvalConfig
from vlp.data.retrieval_split import synthetic_retrieval_split
from vlp.data.synthetic import COLORS, ZEROSHOT_TEMPLATES, SyntheticScenes
from vlp.data.vqa_data import synthetic_vqa
from vlp.errors import UserError
from vlp.eval import distributed, rerank, retrieval, vqa, zeroshot
from vlp.eval.topk import chunked_topk
from vlp.models import VLPModel, VQAModel, build_model
from vlp.precision import (
    ASSUME_AMX_ENV,
    DEFAULT_PRECISION,
    PRECISIONS,
    amx_available,
    autocast_context,
    detect_amx,
    resolve_precision,
)
from vlp.train import finetune
from vlp.types import EncoderOutput

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "pretrain" / "demo_tiny.yaml"  # albef_base_tiny: fused, ITM head, cached image K/V
METER_TINY = ROOT / "configs" / "models" / "meter_base_tiny.yaml"  # update_image: no cached K/V
ITC_TOLERANCE = 0.02
LOGIT_TOLERANCE = 0.05
CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------ AMX detection
def _capabilities(amx: bool) -> Any:
    return lambda: {"amx_tile": amx, "amx_bf16": amx, "avx2": True}


@pytest.mark.parametrize("hardware", [False, True])
def test_amx_detection_and_its_override(monkeypatch: pytest.MonkeyPatch, hardware: bool) -> None:
    monkeypatch.setattr(torch.cpu, "get_capabilities", _capabilities(hardware))
    monkeypatch.delenv(ASSUME_AMX_ENV, raising=False)
    assert detect_amx() is hardware and amx_available() is hardware
    for value, expected in (("1", True), ("0", False), (" 1 ", True), ("", hardware)):
        monkeypatch.setenv(ASSUME_AMX_ENV, value)
        assert amx_available() is expected, value
        assert detect_amx() is hardware  # the bare detection ignores the override
    monkeypatch.setenv(ASSUME_AMX_ENV, "yes")
    with pytest.raises(UserError, match="VLP_ASSUME_AMX='yes' is not 0"):
        amx_available()


def test_amx_tiles_without_bf16_are_no_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ASSUME_AMX_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"amx_tile": True, "amx_bf16": False})
    assert not amx_available()


# ------------------------------------------------------------------------------------------ what auto means
@pytest.mark.parametrize("assume_amx", ["0", "1"])
def test_auto_is_fp32_on_every_cpu(monkeypatch: pytest.MonkeyPatch, assume_amx: str) -> None:
    monkeypatch.setenv(ASSUME_AMX_ENV, assume_amx)
    assert amx_available() is (assume_amx == "1")
    assert resolve_precision("auto", CPU) == "fp32"
    with autocast_context("auto", CPU)():
        assert not torch.is_autocast_enabled("cpu")
    assert resolve_precision("bf16", CPU) == "bf16"  # bf16 on a CPU only when asked for
    with autocast_context("bf16", CPU)():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with pytest.raises(UserError, match=r"eval\.precision: 'fp16' is not one of auto, fp32, bf16"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize("bf16_supported", [False, True])
def test_auto_on_cuda_is_bf16_where_supported(monkeypatch: pytest.MonkeyPatch, bf16_supported: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda) == ("bf16" if bf16_supported else "fp32")
    assert resolve_precision("fp32", cuda) == "fp32" and resolve_precision("bf16", cuda) == "bf16"


def test_every_evaluation_entry_point_shares_one_default() -> None:
    from vlp.cli.main import build_parser

    functions = [retrieval.encode_split, rerank.rerank_candidates,
                 rerank.itm_pair_scores, zeroshot.zeroshot_classifier, zeroshot.evaluate_zeroshot,
                 vqa.evaluate_vqa, distributed.evaluate_vqa_sharded,
                 finetune.evaluate_vqa_split]
    for function in functions:
        assert inspect.signature(function).parameters["precision"].default == DEFAULT_PRECISION, function
    # evaluate_retrieval takes the eval config: its default is EvalConfig's
    assert EvalConfig().precision == retrieval.DEFAULT_EVAL.precision == DEFAULT_PRECISION == "auto"
    from vlp.benchmark.scoring import score_pairs
    from vlp.benchmark.suite import TaskSpec
    from vlp.train.merge import SweepData

    assert inspect.signature(score_pairs).parameters["precision"].default == DEFAULT_PRECISION
    assert TaskSpec(type="retrieval").precision == DEFAULT_PRECISION
    assert SweepData(image_root=Path(".")).precision == DEFAULT_PRECISION
    common = ["--checkpoint", "c", "--data", "d", "--image-root", "r"]
    for command in (["retrieval"], ["vqa"], ["zeroshot", "--classes", "x"]):
        assert build_parser().parse_args(["eval", *command, *common]).precision == DEFAULT_PRECISION, command
        for value in PRECISIONS:
            assert build_parser().parse_args(["eval", *command, *common, "--precision", value]).precision == value


@pytest.mark.parametrize("assume_amx", ["0", "1"])
def test_pretrain_eval_json_says_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             assume_amx: str) -> None:
    """The demo's eval_retrieval.json: the demo config leaves eval.precision at auto, and a run's final
    retrieval evaluation (the demo's code path, on the tiny demo model) records fp32 on CPU."""
    from vlp.train.loop import pretrain

    monkeypatch.setenv(ASSUME_AMX_ENV, assume_amx)
    assert load_config(ROOT / "configs" / "pretrain" / "demo.yaml").eval.precision == "auto"
    config = load_config(TINY, ["train.max_steps=1", "eval.every=0", "train.device=cpu"])
    run_dir = pretrain(config, output_dir=tmp_path / "run")
    assert json.loads((run_dir / "eval_retrieval.json").read_text())["precision"] == "fp32"


# ------------------------------------------------------------------------------------------ bf16 vs fp32
def _model(config: Path) -> VLPModel:
    """A tiny fused model with perturbed weights, so that scores spread beyond bf16 rounding."""
    torch.manual_seed(0)
    model = build_model(load_config(config).model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def _split(model: VLPModel) -> Any:
    return synthetic_retrieval_split(SyntheticScenes(10, seed=1, split="test", image_size=model.image_encoder.image_size))


def _close(full: torch.Tensor, half: torch.Tensor, tolerance: float) -> None:
    assert half.dtype == torch.float32 and full.shape == half.shape
    assert not torch.equal(full, half)  # bf16 really ran
    assert (full - half).abs().max().item() <= tolerance


@pytest.fixture(scope="module")
def encoded() -> tuple[VLPModel, Any, Any]:
    model = _model(TINY)
    transform = model.image_transform(train=False)
    split = _split(model)
    fp32 = retrieval.encode_split(model, split, transform, batch_size=8, precision="fp32", progress=False)
    bf16 = retrieval.encode_split(model, split, transform, batch_size=8, precision="bf16", progress=False)
    return model, fp32, bf16


def test_itc_ranking_scores_bf16_vs_fp32(encoded: tuple[VLPModel, Any, Any]) -> None:
    _, fp32, bf16 = encoded
    _close(fp32.image_emb @ fp32.text_emb.T, bf16.image_emb @ bf16.text_emb.T, ITC_TOLERANCE)


def test_itm_reranking_scores_bf16_vs_fp32(encoded: tuple[VLPModel, Any, Any]) -> None:
    model, fp32, bf16 = encoded
    _, i2t = chunked_topk(fp32.image_emb, fp32.text_emb, 4)
    _, t2i = chunked_topk(fp32.text_emb, fp32.image_emb, 4)
    reference = rerank.rerank_candidates(model, fp32.image_out, fp32.text_out, i2t, t2i, 8, precision="fp32")
    as_bf16 = [EncoderOutput(out.tokens.bfloat16(), out.mask, out.pooled.bfloat16())
               for out in (fp32.image_out, fp32.text_out)]
    runs = [  # (image outputs, text outputs, re-ranking precision)
        (bf16.image_out, bf16.text_out, "bf16"),  # encoded and re-ranked in bf16
        (bf16.image_out, bf16.text_out, "fp32"),
        (fp32.image_out, fp32.text_out, "bf16"),
        (*as_bf16, "fp32"),  # bf16 tokens (a model whose encoders end in bf16) into the fp32 model
        (*as_bf16, "bf16"),
    ]
    for image_out, text_out, precision in runs:
        scores = rerank.rerank_candidates(model, image_out, text_out, i2t, t2i, 8, precision=precision)
        for full, half in zip(reference, scores):
            _close(full, half, LOGIT_TOLERANCE)


def test_reranking_casts_tokens_to_a_bf16_model() -> None:
    """Inputs cross into the model in its own dtype: fp32 encoder outputs re-rank with a bf16 model."""
    for config in (TINY, METER_TINY):  # cached image keys/values, and fusion that updates the image side
        model = _model(config)
        split = _split(model)
        outputs = retrieval.encode_split(model, split, model.image_transform(train=False), batch_size=8,
                                         precision="fp32", progress=False)
        _, i2t = chunked_topk(outputs.image_emb, outputs.text_emb, 3)
        _, t2i = chunked_topk(outputs.text_emb, outputs.image_emb, 3)
        reference = rerank.rerank_candidates(model, outputs.image_out, outputs.text_out, i2t, t2i, 8,
                                             precision="fp32")
        scores = rerank.rerank_candidates(model.to(torch.bfloat16), outputs.image_out, outputs.text_out, i2t,
                                          t2i, 8, precision="fp32")
        for full, half in zip(reference, scores):
            _close(full, half, LOGIT_TOLERANCE)


def test_zeroshot_scores_bf16_vs_fp32() -> None:
    model = _model(TINY)
    templates = list(ZEROSHOT_TEMPLATES["color"])
    scenes = SyntheticScenes(8, seed=2, split="test", image_size=model.image_encoder.image_size)
    transform = model.image_transform(train=False)
    images = [transform(scenes.render(i)) for i in range(len(scenes))]
    scores = {}
    for precision in ("fp32", "bf16"):  # the class embeddings and the image embeddings evaluate_zeroshot ranks by
        classifier = zeroshot.zeroshot_classifier(model, COLORS, templates, batch_size=4, precision=precision)
        image_emb, _ = retrieval.encode_images(model, images, 4, 0, CPU, autocast_context(precision, CPU),
                                               keep=False, progress=False)
        scores[precision] = image_emb @ classifier.T
    _close(scores["fp32"], scores["bf16"], ITC_TOLERANCE)
    labelled = _Labelled(images, [0] * len(images))
    result = zeroshot.evaluate_zeroshot(model, labelled, None, COLORS, templates, batch_size=4, precision="bf16",
                                        progress=False, itm_rerank_k=2)
    assert result["precision"] == "bf16" and "itm_top1" in result
    assert zeroshot.evaluate_zeroshot(model, labelled, None, COLORS, templates, batch_size=4,
                                      progress=False)["precision"] == "fp32"


class _Labelled:
    def __init__(self, images: list[torch.Tensor], labels: list[int]) -> None:
        self.images, self.labels = images, labels

    def image_dataset(self, transform: Any) -> list[torch.Tensor]:
        return self.images


def test_vqa_logits_bf16_vs_fp32() -> None:
    model = _model(TINY)
    scenes = SyntheticScenes(4, seed=0, split="test", image_size=model.image_encoder.image_size)
    questions = synthetic_vqa(scenes)[:12]
    answers = vqa.AnswerVocab.build(questions, top_n=8)
    torch.manual_seed(1)
    vqa_model = VQAModel(model, len(answers)).eval()
    transform = model.image_transform(train=False)
    images = torch.stack([transform(scenes.render(record["image"])) for record in questions])
    tokens = model.tokenizer([str(record["question"]) for record in questions], max_length=30)
    logits = {}
    with torch.no_grad():
        for precision in ("fp32", "bf16"):
            with autocast_context(precision, CPU)():
                logits[precision] = vqa_model(images, tokens["input_ids"], tokens["attention_mask"])
    _close(logits["fp32"], logits["bf16"], LOGIT_TOLERANCE)

    def load_image(image: Any) -> torch.Tensor:
        return transform(scenes.render(image))

    for precision, expected in (("bf16", "bf16"), ("auto", "fp32")):
        _, metrics = vqa.evaluate_vqa(vqa_model, questions, load_image, answers, batch_size=5, progress=False,
                                      precision=precision)
        assert metrics["precision"] == expected
