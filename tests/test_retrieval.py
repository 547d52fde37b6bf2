"""Retrieval metrics, chunked scoring, batched ITM re-ranking and the evaluate_retrieval harness.

The models here are small stand-ins with VLPModel's evaluation interface, so these tests do not depend
on the model package.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from vlp.config.schema import EvalConfig
from vlp.errors import UserError
from vlp.eval.plots import plot_recall_curve
from vlp.eval.rerank import rerank_candidates
from vlp.eval.retrieval import (
    chunked_ranks,
    chunked_topk,
    encode_split,
    evaluate_retrieval,
    positives_from_txt2img,
    retrieval_metrics,
)
from vlp.types import EncoderOutput

# ---------------------------------------------------------------------------------------------- stand-ins
PAD, CLS = 0, 1


class WordTokenizer:
    """Hashes words to ids; [CLS] first; right-padded to the longest text of the batch."""

    def __init__(self, vocab_size: int = 64) -> None:
        self.vocab_size = vocab_size

    def word_id(self, word: str) -> int:
        return 2 + zlib.crc32(word.encode()) % (self.vocab_size - 2)

    def __call__(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        rows = [[CLS] + [self.word_id(w) for w in text.split()][: max_length - 1] for text in texts]
        length = max(len(row) for row in rows)
        ids = torch.tensor([row + [PAD] * (length - len(row)) for row in rows])
        return {"input_ids": ids, "attention_mask": ids != PAD}


@dataclass
class Context:
    tokens: Tensor
    mask: Tensor
    kv: tuple[Tensor, Tensor]

    def select(self, index: Tensor) -> Context:
        return Context(self.tokens[index], self.mask[index], (self.kv[0][index], self.kv[1][index]))


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    weights = mask.float()[..., None]
    return (tokens * weights).sum(1) / weights.sum(1)


class TinyFused(nn.Module):
    """Patch-linear image encoder, embedding text encoder, one cross-attention layer + ITM head."""

    def __init__(self, dim: int = 16, embed_dim: int = 8, fused: bool = True) -> None:
        super().__init__()
        self.tokenizer = WordTokenizer()
        self.config = SimpleNamespace(text=SimpleNamespace(max_length=12))
        self.has_fusion = fused
        self.patch = nn.Linear(3 * 4 * 4, dim)
        self.words = nn.Embedding(self.tokenizer.vocab_size, dim)
        self.image_proj, self.text_proj = nn.Linear(dim, embed_dim), nn.Linear(dim, embed_dim)
        self.key, self.value, self.query = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.itm_head = nn.Linear(2 * dim, 2)

    def logit_scale(self) -> Tensor:
        return torch.tensor(7.0)

    def image_features(self, images: Tensor) -> tuple[EncoderOutput, Tensor]:
        patches = rearrange(images, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=4, p2=4)
        tokens = torch.tanh(self.patch(patches))
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        return EncoderOutput(tokens, mask, tokens[:, 0]), F.normalize(self.image_proj(tokens[:, 0]), dim=-1)

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[EncoderOutput, Tensor]:
        tokens = self.words(input_ids)
        pooled = masked_mean(tokens, attention_mask.bool())
        emb = F.normalize(self.text_proj(pooled), dim=-1)
        return EncoderOutput(tokens, attention_mask.bool(), pooled), emb

    def image_context(self, image_out: EncoderOutput) -> Context:
        tokens = image_out.tokens
        return Context(tokens, image_out.mask, (self.key(tokens), self.value(tokens)))

    def itm_logits_from(self, text_out: EncoderOutput, context: Context, index: Tensor) -> Tensor:
        picked = context.select(index)
        keys, values = picked.kv
        attended = F.scaled_dot_product_attention(self.query(text_out.tokens), keys, values,
                                                  attn_mask=picked.mask[:, None, :])
        pooled = masked_mean(attended, text_out.mask)
        return self.itm_head(torch.cat([pooled, text_out.pooled], dim=-1)).float()

    def itm_logits(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        context = self.image_context(self.image_features(images)[0])
        text_out, _ = self.text_features(input_ids, attention_mask)
        return self.itm_logits_from(text_out, context, torch.arange(len(images)))


@dataclass
class Split:
    images: list[Tensor]
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.img2txt = [[t for t, i in enumerate(self.txt2img) if i == image]
                        for image in range(self.num_images)]

    @property
    def num_images(self) -> int:
        return len(self.images)

    def image_dataset(self, transform: Any) -> list[Tensor]:
        return [image if transform is None else transform(image) for image in self.images]


WORDS = "red blue green cat dog bird sits runs on a the small big tree car".split()


def make_split(num_images: int, captions_per_image: int = 2, seed: int = 0) -> Split:
    generator = torch.Generator().manual_seed(seed)
    images = list(torch.rand(num_images, 3, 8, 8, generator=generator))
    captions, txt2img = [], []
    for image in range(num_images):
        for _ in range(captions_per_image):
            length = int(torch.randint(2, 7, (1,), generator=generator))
            picks = torch.randint(0, len(WORDS), (length,), generator=generator).tolist()
            captions.append(" ".join(WORDS[p] for p in picks))
            txt2img.append(image)
    return Split(images, captions, txt2img)


# ---------------------------------------------------------------------------------------------- metrics
def brute_force_metrics(scores_i2t: Tensor, txt2img: list[int],
                        scores_t2i: Tensor | None = None) -> dict[str, float]:
    """Per-query loop: sort by score, ties broken against the ground truth; the rank is the first hit."""
    t2i = scores_i2t.T if scores_t2i is None else scores_t2i

    def rank(row: list[float], truths: set[int]) -> int:
        order = sorted(range(len(row)), key=lambda j: (-row[j], j in truths))
        return next(position for position, j in enumerate(order) if j in truths)

    txt = [rank(scores_i2t[i].tolist(), {t for t, img in enumerate(txt2img) if img == i})
           for i in range(len(scores_i2t))]
    img = [rank(t2i[t].tolist(), {txt2img[t]}) for t in range(len(txt2img))]
    out = {}
    for side, ranks in (("txt", txt), ("img", img)):
        for k in (1, 5, 10):
            out[f"{side}_r{k}"] = 100.0 * sum(r < k for r in ranks) / len(ranks)
        out[f"{side}_r_mean"] = (out[f"{side}_r1"] + out[f"{side}_r5"] + out[f"{side}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def assert_metrics_equal(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("seed", range(4))
def test_metrics_match_brute_force_with_ties_and_several_captions(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    num_images = 13
    txt2img = torch.randint(0, num_images, (40,), generator=generator).tolist()
    txt2img[:num_images] = range(num_images)  # every image has a caption
    scores = torch.randint(0, 6, (num_images, 40), generator=generator).float()  # many ties
    assert_metrics_equal(retrieval_metrics(scores, txt2img), brute_force_metrics(scores, txt2img))
    continuous = torch.randn(num_images, 40, generator=generator)
    assert_metrics_equal(retrieval_metrics(continuous, txt2img), brute_force_metrics(continuous, txt2img))
    t2i = torch.randint(0, 3, (40, num_images), generator=generator).float()
    assert_metrics_equal(retrieval_metrics(scores, txt2img, t2i), brute_force_metrics(scores, txt2img, t2i))


def test_perfect_and_worst_rankings() -> None:
    txt2img = [i for i in range(12) for _ in range(2)]
    truth = (torch.tensor(txt2img)[None, :] == torch.arange(12)[:, None]).float()
    perfect = retrieval_metrics(truth, txt2img)
    assert all(value == 100.0 for value in perfect.values())
    worst = retrieval_metrics(-truth, txt2img)  # every ground truth below 22 / 11 other items
    assert all(value == 0.0 for value in worst.values())


def test_ties_rank_pessimistically() -> None:
    scores = torch.tensor([[0.5, 0.5], [0.2, 0.9]])
    metrics = retrieval_metrics(scores, [0, 1])
    # Image 0's caption ties with caption 1, so it ranks second; caption queries have no ties.
    assert metrics["txt_r1"] == 50.0 and metrics["txt_r5"] == 100.0
    assert metrics["img_r1"] == 100.0
    assert retrieval_metrics(torch.zeros(3, 3), [0, 1, 2])["txt_r1"] == 0.0


def test_image_query_ranks_its_best_caption() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.5], [0.9, 0.8, 0.7, 0.6]])
    metrics = retrieval_metrics(scores, [0, 0, 0, 1], img2txt=[[0, 1, 2], [3]])
    assert metrics["txt_r1"] == 50.0  # image 0: caption 1 first; image 1: its caption is 4th
    assert metrics["txt_r5"] == 100.0
    # caption queries: captions 0 and 2 score image 1 higher, captions 1 and 3 rank their image first
    assert metrics["img_r1"] == 50.0
    assert metrics["txt_r_mean"] == pytest.approx((50 + 100 + 100) / 3)
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)


def test_separate_t2i_scores_are_used() -> None:
    txt2img = [i for i in range(11)]
    truth = torch.eye(11)
    metrics = retrieval_metrics(truth, txt2img, scores_t2i=-truth)
    assert metrics["txt_r1"] == 100.0 and metrics["img_r10"] == 0.0


def test_bad_metric_inputs_are_user_errors() -> None:
    with pytest.raises(UserError, match="img2txt and txt2img disagree"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1, 1], img2txt=[[0, 1], [2]])
    with pytest.raises(UserError, match="no ground-truth caption"):
        retrieval_metrics(torch.zeros(3, 2), [0, 1])
    with pytest.raises(UserError, match="scores_t2i"):
        retrieval_metrics(torch.zeros(2, 2), [0, 1], scores_t2i=torch.zeros(3, 2))


# ---------------------------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("memory_mb", [0.0001, 0.001, 64])
def test_chunked_ranks_equal_full_matrix_ranks(memory_mb: float) -> None:
    generator = torch.Generator().manual_seed(2)
    images, texts = torch.randn(9, 5, generator=generator), torch.randn(27, 5, generator=generator)
    txt2img = torch.arange(27) % 9
    expected = brute_force_metrics(images @ texts.T, txt2img.tolist())
    positives = positives_from_txt2img(txt2img, 9)
    from vlp.eval.retrieval import recall_metrics

    metrics = recall_metrics(chunked_ranks(images, texts, positives, memory_mb),
                             chunked_ranks(texts, images, txt2img[:, None], memory_mb))
    assert_metrics_equal(metrics, expected)


# ---------------------------------------------------------------------------------------------- re-ranking
def per_pair_logits(model: TinyFused, split: Split, image: int, text: int, rule: str = "log_odds") -> float:
    """One pair's match score, computed by hand: the head's log-odds, or (``logit``) its column 1 alone."""
    tokens = model.tokenizer([split.captions[text]], max_length=model.config.text.max_length)
    logits = model.itm_logits(split.images[image][None], tokens["input_ids"], tokens["attention_mask"])
    return float(logits[0, 1] if rule == "logit" else logits[0, 1] - logits[0, 0])


def encoded(model: TinyFused, split: Split) -> Any:
    return encode_split(model, split, None, batch_size=4, precision="fp32", progress=False)


def test_batched_rerank_equals_per_pair_calls() -> None:
    torch.manual_seed(0)
    model, split = TinyFused().eval(), make_split(7, captions_per_image=3)
    with torch.no_grad():
        enc = encoded(model, split)
        _, i2t = chunked_topk(enc.image_emb, enc.text_emb, 5)
        _, t2i = chunked_topk(enc.text_emb, enc.image_emb, 4)
        i2t_scores, t2i_scores = rerank_candidates(model, enc.image_out, enc.text_out, i2t, t2i, batch_size=3,
                                                   precision="fp32")
        for image in range(7):
            for j in range(5):
                assert float(i2t_scores[image, j]) == pytest.approx(
                    per_pair_logits(model, split, image, int(i2t[image, j])), abs=1e-5)
        for text in range(21):
            for j in range(4):
                assert float(t2i_scores[text, j]) == pytest.approx(
                    per_pair_logits(model, split, int(t2i[text, j]), text), abs=1e-5)


@pytest.mark.parametrize("score", ["itm", "itm_logit", "itm+itc", "itm+itc_logit"])
def test_evaluate_retrieval_equals_full_reranked_matrices(score: str) -> None:
    """evaluate_retrieval never builds N x M; its metrics equal retrieval_metrics on the full matrices where
    re-scored candidates sit above every other item and the rest keep their ITC order."""
    torch.manual_seed(1)
    model, split = TinyFused(), make_split(9, captions_per_image=2, seed=3)
    k = 4
    result = evaluate_retrieval(model, split, None, EvalConfig(k_test=k, score=score, batch_size=5,
                                precision="fp32"), progress=False)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        enc = encoded(model, split)
    sims = (enc.image_emb @ enc.text_emb.T).double()
    assert_metrics_equal(result["itc"], brute_force_metrics(sims, split.txt2img))

    def reranked(matrix: Tensor, pair: Any) -> Tensor:
        top = matrix.topk(k, dim=1).indices
        full = matrix - 1000.0  # below every re-scored candidate, same order
        for query in range(matrix.shape[0]):
            for gallery in top[query].tolist():
                logit = per_pair_logits(model, split, *pair(query, gallery),
                                        rule="logit" if score == "itm_logit" else "log_odds")
                itc = float(model.logit_scale()) if score == "itm+itc_logit" else float(score == "itm+itc")
                full[query, gallery] = logit + itc * float(matrix[query, gallery])
        return full

    with torch.no_grad():
        i2t = reranked(sims, lambda q, g: (q, g))
        t2i = reranked(sims.T.contiguous(), lambda q, g: (g, q))
    assert_metrics_equal(result["itm"], brute_force_metrics(i2t, split.txt2img, t2i))
    assert result["score"] == score and result["k_test"] == k
    assert (result["num_images"], result["num_texts"]) == (9, 18)
    curve = result["curves"]["itm"]["txt"]
    assert [curve[0], curve[4], curve[9]] == pytest.approx(
        [result["itm"]["txt_r1"], result["itm"]["txt_r5"], result["itm"]["txt_r10"]])


class OracleFused(nn.Module):
    """Fixed ITC embeddings; the ITM logit is 1 exactly for ground-truth pairs."""

    def __init__(self, txt2img: list[int], noise: float, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.txt2img = torch.tensor(txt2img)
        num_images = int(self.txt2img.max()) + 1
        self.image_table = F.normalize(torch.randn(num_images, 8, generator=generator), dim=-1)
        jitter = noise * torch.randn(len(txt2img), 8, generator=generator)
        self.text_table = F.normalize(self.image_table[self.txt2img] + jitter, dim=-1)
        self.config = SimpleNamespace(text=SimpleNamespace(max_length=4))
        self.has_fusion = True

    def tokenizer(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        """Caption t is the text "t": ids [CLS, 2 + t]."""
        return {"input_ids": torch.tensor([[CLS, 2 + int(t)] for t in texts]),
                "attention_mask": torch.ones(len(texts), 2, dtype=torch.bool)}
    def image_features(self, images: Tensor) -> tuple[EncoderOutput, Tensor]:
        ids = images[:, 0, 0, 0].long()
        tokens = ids.float()[:, None, None]
        mask = torch.ones(len(ids), 1, dtype=torch.bool)
        return EncoderOutput(tokens, mask, tokens[:, 0]), self.image_table[ids]

    def text_features(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[EncoderOutput, Tensor]:
        ids = input_ids[:, 1] - 2
        tokens = ids.float()[:, None, None].expand(-1, input_ids.shape[1], 1)
        return EncoderOutput(tokens, attention_mask.bool(), tokens[:, 0]), self.text_table[ids]

    def image_context(self, image_out: EncoderOutput) -> Context:
        return Context(image_out.tokens, image_out.mask, (image_out.tokens, image_out.tokens))

    def itm_logits_from(self, text_out: EncoderOutput, context: Context, index: Tensor) -> Tensor:
        texts, images = text_out.tokens[:, 0, 0].long(), context.select(index).tokens[:, 0, 0].long()
        match = (self.txt2img[texts] == images).float()
        return torch.stack([torch.zeros_like(match), match], dim=1)


@pytest.mark.parametrize("k_test", [5, 10])
def test_oracle_itm_moves_recall_at_k_to_recall_at_1(k_test: int) -> None:
    txt2img = [i for i in range(30) for _ in range(2)]
    model = OracleFused(txt2img, noise=1.2)
    images = [torch.full((3, 2, 2), float(i)) for i in range(30)]
    split = Split(images, [str(t) for t in range(60)], txt2img)
    result = evaluate_retrieval(model, split, None, EvalConfig(k_test=k_test, batch_size=7,
                                precision="fp32"), progress=False)
    itc, itm = result["itc"], result["itm"]
    assert itc["txt_r1"] < itc[f"txt_r{k_test}"] < 100 and itc["img_r1"] < itc[f"img_r{k_test}"] < 100
    assert itm["txt_r1"] == itc[f"txt_r{k_test}"]
    assert itm["img_r1"] == itc[f"img_r{k_test}"]
    # A ground truth outside the re-ranked candidates keeps its ITC rank: recall beyond k_test is unchanged.
    assert (itm["txt_r10"], itm["img_r10"]) == (itc["txt_r10"], itc["img_r10"])


def test_dual_encoder_has_no_itm_and_max_images_subsets() -> None:
    torch.manual_seed(2)
    model, split = TinyFused(fused=False), make_split(8, seed=5)
    result = evaluate_retrieval(model, split, None, EvalConfig(k_test=100),
                                progress=False)  # unused without fusion
    assert "itm" not in result and set(result["curves"]) == {"itc"}
    small = evaluate_retrieval(model, split, None, EvalConfig(max_images=3), progress=False)
    first3 = Split(split.images[:3], split.captions[:6], split.txt2img[:6])
    assert small["itc"] == evaluate_retrieval(model, first3, None, progress=False)["itc"]
    assert (small["num_images"], small["num_texts"]) == (3, 6)


def test_bf16_encoding_is_close_to_fp32_and_returns_fp32() -> None:
    torch.manual_seed(3)
    model, split = TinyFused().eval(), make_split(6, seed=1)
    fp32 = encode_split(model, split, None, batch_size=4, precision="fp32", progress=False)
    bf16 = encode_split(model, split, None, batch_size=4, precision="bf16", progress=False)
    for full, half in ((fp32.image_emb, bf16.image_emb), (fp32.text_emb, bf16.text_emb)):
        assert half.dtype == torch.float32
        torch.testing.assert_close(half.norm(dim=-1), torch.ones(len(half)))
        torch.testing.assert_close(half, full, atol=0.03, rtol=0.0)
    result = evaluate_retrieval(model, split, None, EvalConfig(k_test=3, precision="bf16"), progress=False)
    assert set(result["itm"]) == set(result["itc"]) and 0.0 <= result["itm"]["r_mean"] <= 100.0


@pytest.mark.parametrize("assume_amx", ["0", "1"])
def test_auto_precision_is_fp32_on_cpus_with_and_without_amx(monkeypatch: pytest.MonkeyPatch,
                                                              assume_amx: str) -> None:
    monkeypatch.setenv("VLP_ASSUME_AMX", assume_amx)
    model, split = TinyFused().eval(), make_split(4)
    result = evaluate_retrieval(model, split, None, EvalConfig(k_test=2), progress=False)
    assert result["precision"] == "fp32"
    pinned = evaluate_retrieval(model, split, None, EvalConfig(k_test=2, precision="fp32"), progress=False)
    assert result["itc"] == pinned["itc"] and result["itm"] == pinned["itm"]
    assert evaluate_retrieval(model, split, None, EvalConfig(k_test=2, precision="bf16"),
                              progress=False)["precision"] == "bf16"


def test_bf16_tokens_rerank_with_an_fp32_model() -> None:
    """Tokens encoded under bf16 (this model's encoders end in bf16 there) re-rank under every precision:
    they are cast to the model's dtype as they enter it."""
    torch.manual_seed(0)
    model, split = TinyFused().eval(), make_split(7, captions_per_image=3)
    with torch.no_grad():
        half = encode_split(model, split, None, batch_size=4, precision="bf16", progress=False)
        full = encoded(model, split)
        assert half.image_out is not None and half.image_out.tokens.dtype == torch.bfloat16
        _, i2t = chunked_topk(full.image_emb, full.text_emb, 5)
        _, t2i = chunked_topk(full.text_emb, full.image_emb, 4)
        reference = rerank_candidates(model, full.image_out, full.text_out, i2t, t2i, batch_size=3,
                                      precision="fp32")
        for precision in ("auto", "fp32", "bf16"):
            scores = rerank_candidates(model, half.image_out, half.text_out, i2t, t2i, batch_size=3,
                                       precision=precision)
            for a, b in zip(reference, scores):
                assert b.dtype == torch.float32
                torch.testing.assert_close(b, a, atol=0.05, rtol=0.0)


def test_bad_eval_settings_are_user_errors() -> None:
    model, split = TinyFused(), make_split(4)
    with pytest.raises(UserError, match=r"k_test = 0: must be positive"):
        evaluate_retrieval(model, split, None, EvalConfig(k_test=0), progress=False)
    clamped = evaluate_retrieval(model, split, None, EvalConfig(k_test=5),
                                 progress=False)  # a small gallery: all re-ranked
    assert (clamped["k_test"], clamped["k_test_requested"]) == (4, 5)
    assert clamped["itm"] == evaluate_retrieval(model, split, None, EvalConfig(k_test=4),
                                                progress=False)["itm"]
    with pytest.raises(UserError, match=r"eval\.score"):
        evaluate_retrieval(model, split, None, EvalConfig(score="itc"), progress=False)
    with pytest.raises(UserError, match=r"eval\.precision"):
        evaluate_retrieval(model, split, None, EvalConfig(k_test=2, precision="fp16"), progress=False)


def test_recall_curve_png(tmp_path: Any) -> None:
    model, split = TinyFused(), make_split(5, seed=2)
    result = evaluate_retrieval(model, split, None, EvalConfig(k_test=3), progress=False)
    path = plot_recall_curve(result, tmp_path / "plots" / "recall.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert result["curves"]["itc"]["img"][-1] == 100.0 and len(result["curves"]["itc"]["img"]) == 5
    with pytest.raises(UserError, match="recall curves"):
        plot_recall_curve({"itc": {"txt_r1": 1.0}}, tmp_path / "bad.png")


@dataclass
class IndexedSplit:
    """vlp.data's layout: images loaded one at a time by index, the caller's transform applied after."""

    load_image: Any
    num_images: int
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]


def test_splits_that_load_images_by_index() -> None:
    torch.manual_seed(4)
    model, split = TinyFused(), make_split(6, seed=4)
    indexed = IndexedSplit(lambda i: split.images[i] * 0.5, 6, split.captions, split.txt2img, split.img2txt)
    expected = evaluate_retrieval(model, split, lambda image: image * 0.5, EvalConfig(k_test=3),
                                  progress=False)
    result = evaluate_retrieval(model, indexed, lambda image: image, EvalConfig(k_test=3, max_images=4),
                                progress=False)
    assert result["num_images"] == 4
    assert evaluate_retrieval(model, indexed, None, EvalConfig(k_test=3), progress=False) == expected


def test_match_score_is_the_log_odds_the_loss_trains() -> None:
    """The ITM cross-entropy depends on logit 1 - logit 0 only: the sum of the two columns gets no gradient,
    so column 1 alone (ALBEF/BLIP's ``itm_logit``) carries a projection left from initialization. The
    default log-odds ranks a pair by what was learned; ``itm_logit`` stays one flag away."""
    from vlp.eval.rerank import match_rule_for, match_scores

    torch.manual_seed(0)
    head = nn.Linear(8, 2)
    pooled = torch.randn(16, 8)
    labels = torch.randint(0, 2, (16,))
    nn.functional.cross_entropy(head(pooled), labels).backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    assert torch.allclose(head.weight.grad.sum(0), torch.zeros(8), atol=1e-7)  # no gradient on w1 + w0
    assert abs(float(head.bias.grad.sum())) < 1e-7
    logits = torch.tensor([[2.0, 3.0], [-1.0, 0.5]])
    assert match_scores(logits).tolist() == [1.0, 1.5]
    assert match_scores(logits, "logit").tolist() == [3.0, 0.5]
    assert [match_rule_for(s) for s in ("itm", "itm+itc", "itm_logit")] == ["log_odds", "log_odds", "logit"]
    with pytest.raises(ValueError, match="log_odds"):
        match_scores(logits, "probability")
