"""vlp convert: tiny random source models (transformers / open_clip), saved locally, converted and compared.

Each source's own library is the reference: the converted vlp model must give its image and text
embeddings and its matching scores to 1e-5 in fp32 on the same pixels and token ids, and the converted
tokenizer its ids. Weights are perturbed after init so that outputs depend on every tensor.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import vlp
from vlp.cli.main import main
from vlp.convert import convert
from vlp.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
CAPTIONS = ["the red circle is left of a blue square", "A small green triangle.", "two shapes"]
WIDTH: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
VISION: dict[str, Any] = {**WIDTH, "image_size": 16, "patch_size": 8}


def perturbed(model: nn.Module, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


def images(count: int = 3, size: int = 16) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(1))


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def bert_tokenizer(extra: tuple[str, ...] = ()) -> Any:
    from transformers import BertTokenizer

    from vlp.data.synthetic import SYNTHETIC_WORDS

    words = sorted({w.lower() for w in SYNTHETIC_WORDS} | set(string.punctuation))
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *extra])}
    kwargs: dict[str, Any] = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]} if extra else {}
    return BertTokenizer(vocab=vocab, **kwargs)


def clip_tokenizer() -> Any:
    """A byte-level BPE in CLIP's format: characters, word-final characters, a few merges, specials last."""
    from transformers import CLIPTokenizer

    letters = string.ascii_lowercase
    vocab = {c: i for i, c in enumerate(string.punctuation + string.digits + letters)}
    for c in letters + string.punctuation:
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>"), ("r", "e"), ("re", "d</w>"), ("i", "s</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    merge_pairs: Any = merges  # tokenizers takes (left, right) pairs; the stub says strings
    return CLIPTokenizer(vocab=vocab, merges=merge_pairs)


def hf_ids(tokenizer: Any) -> dict[str, torch.Tensor]:
    batch = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].bool()}


def vlp_ids(checkpoint: Path) -> dict[str, torch.Tensor]:
    _, tokenizer, _ = vlp.load(checkpoint)
    return dict(tokenizer(CAPTIONS, max_length=48))


def check_report(checkpoint: Path) -> dict[str, Any]:
    report = json.loads((checkpoint / "conversion.json").read_text())
    assert report["unused_source_tensors"] == [] and report["uninitialized_vlp_tensors"] == []
    assert report["tensors"] > 0
    return report


# sources ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    from transformers import CLIPConfig, CLIPModel

    src = tmp_path_factory.mktemp("clip") / "hf"
    tokenizer = clip_tokenizer()
    tokenizer.save_pretrained(src)
    special = {"bos_token_id": len(tokenizer) - 2, "eos_token_id": len(tokenizer) - 1, "pad_token_id": len(tokenizer) - 1}
    config = CLIPConfig(text_config={**WIDTH, "vocab_size": len(tokenizer), "max_position_embeddings": 48, **special},
                        vision_config=VISION, projection_dim=24)
    model = perturbed(CLIPModel(config))
    model.save_pretrained(src)
    (src / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2] * 3}))
    out = src.parent / "vlp"
    convert("clip", src, out)
    return model, src, out


@pytest.fixture(scope="module")
def blip_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    from transformers import BlipConfig, BlipForImageTextRetrieval

    src = tmp_path_factory.mktemp("blip") / "hf"
    tokenizer = bert_tokenizer(extra=("[DEC]", "[ENC]"))
    tokenizer.save_pretrained(src)
    text = {**WIDTH, "vocab_size": len(tokenizer), "max_position_embeddings": 24, "pad_token_id": 0,
            "bos_token_id": tokenizer.convert_tokens_to_ids("[DEC]"), "sep_token_id": 3}
    # vision wider than text, as BLIP large (1024 and 768): the cross-attention reads 48-wide image tokens
    vision = {**VISION, "hidden_size": 48, "intermediate_size": 96}
    model = perturbed(BlipForImageTextRetrieval(BlipConfig(text_config=text, vision_config=vision,
                                                           image_text_hidden_size=24)))
    model.save_pretrained(src)
    out = src.parent / "vlp"
    convert("blip_itm", src, out)
    return model, src, out


@pytest.fixture(scope="module")
def vilt_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    from transformers import ViltConfig, ViltForImageAndTextRetrieval

    src = tmp_path_factory.mktemp("vilt") / "hf"
    tokenizer = bert_tokenizer()
    tokenizer.save_pretrained(src)
    config = ViltConfig(**VISION, vocab_size=len(tokenizer), max_position_embeddings=24)
    model = perturbed(ViltForImageAndTextRetrieval(config))
    model.save_pretrained(src)
    out = src.parent / "vlp"
    convert("vilt", src, out)
    return model, src, out


# equivalence -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["local_dir", "file_and_json"])
def test_open_clip_matches_open_clip(layout: str, tmp_path: Path) -> None:
    import open_clip

    # local_dir: a CLIP (QuickGELU, causal text); file_and_json: a CustomTextCLIP with a SigLIP-style text
    # tower (bidirectional, last-token pooling, projection bias) and a logit bias.
    text_cfg: dict[str, Any] = {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    cfg: dict[str, Any] = {"embed_dim": 24, "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32,
                                                           "layers": 2, "head_width": 16}, "text_cfg": text_cfg}
    if layout == "local_dir":
        cfg["quick_gelu"] = True
        reference = perturbed(open_clip.CLIP(**cfg))
    else:
        text_cfg |= {"no_causal_mask": True, "pool_type": "last", "proj_bias": True, "pad_id": 0}
        reference = perturbed(open_clip.CustomTextCLIP(**cfg, init_logit_bias=-5.0))
    src = tmp_path / "oc"
    src.mkdir()
    if layout == "local_dir":
        safetensors.torch.save_file(reference.state_dict(), str(src / "open_clip_model.safetensors"))
        (src / "open_clip_config.json").write_text(json.dumps(
            {"model_cfg": cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}}))
        report = convert("open_clip", src, tmp_path / "vlp")
    else:
        torch.save({"state_dict": reference.state_dict()}, src / "checkpoint.pt")
        (src / "model.json").write_text(json.dumps(cfg))
        report = convert("open_clip", src / "checkpoint.pt", tmp_path / "vlp", model=str(src / "model.json"))
    assert report.unused_source == [] and report.uninitialized == [] and not report.defaulted
    model, tokenizer, transform = vlp.load(tmp_path / "vlp")
    reference_ids = open_clip.get_tokenizer("RN50")(CAPTIONS, context_length=12)
    batch = tokenizer(CAPTIONS, max_length=12)
    assert torch.equal(batch["input_ids"], reference_ids[:, : batch["input_ids"].shape[1]])
    pixels = images()
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), reference.encode_image(pixels, normalize=True), atol=ATOL)
        assert torch.allclose(model.encode_text(**batch), reference.encode_text(reference_ids, normalize=True),
                              atol=ATOL)
        assert torch.allclose(model.logit_scale(), reference.logit_scale.exp())
        if layout == "file_and_json":
            assert torch.allclose(model.temperature.logit_bias(), reference.logit_bias.reshape(()))
    expected_mean = [0.5] * 3 if layout == "local_dir" else list(open_clip.constants.OPENAI_DATASET_MEAN)
    assert list(model.image_encoder.mean) == pytest.approx(expected_mean)


def test_open_clip_siglip_tokenizer_canonicalizes(tmp_path: Path) -> None:
    """open_clip's SigLIP configs name a Hugging Face tokenizer with ``clean: canonicalize``: the converted
    tokenizer canonicalizes too (a config without it uses the tokenizer as is, with a note)."""
    import open_clip
    from open_clip.tokenizer import canonicalize_text
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    canonical = [canonicalize_text(caption) for caption in CAPTIONS]
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *sorted(set(" ".join(canonical).split()))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    text_cfg: dict[str, Any] = {"context_length": 12, "vocab_size": len(vocab), "width": 32, "heads": 2, "layers": 1,
                                "no_causal_mask": True, "pool_type": "last", "proj_bias": True, "pad_id": 0,
                                "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}
    vision_cfg = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
    for kwargs, cleaning in (({"clean": "canonicalize"}, "canonicalize"), ({"clean": "lower"}, "none")):
        cfg = {"embed_dim": 24, "vision_cfg": vision_cfg, "text_cfg": {**text_cfg, "tokenizer_kwargs": kwargs}}
        src, out = tmp_path / f"oc_{cleaning}", tmp_path / f"vlp_{cleaning}"
        src.mkdir()
        backend.save(str(src / "tokenizer.json"))
        reference = open_clip.CustomTextCLIP(**cfg, init_logit_bias=-5.0)
        safetensors.torch.save_file(reference.state_dict(), str(src / "open_clip_model.safetensors"))
        (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
        report = convert("open_clip", src, out)
        _, tokenizer, _ = vlp.load(out)
        assert tokenizer.text_cleaning == cleaning
        assert any(("canonicalized" if cleaning == "canonicalize" else "as is") in note for note in report.notes)
    ids = tokenizer(["A small green triangle."], max_length=12)["input_ids"][0].tolist()
    assert 2 in ids  # uncleaned: "A" and "triangle." are unknown


@pytest.mark.slow
def test_open_clip_checkpoint_of_a_built_in_model(tmp_path: Path) -> None:
    import open_clip

    reference = open_clip.create_model("ViT-S-32-alt").eval()  # random init: nothing is downloaded
    torch.save(reference.state_dict(), tmp_path / "weights.pt")
    report = convert("open_clip", tmp_path / "weights.pt", tmp_path / "vlp", model="ViT-S-32-alt")
    assert report.unused_source == [] and report.uninitialized == []
    model, tokenizer, _ = vlp.load(tmp_path / "vlp")
    assert model.config.image.name == model.config.text.name == "ViT-S-32-alt"
    batch, pixels = tokenizer(CAPTIONS, max_length=77), images(2, 224)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(pixels), reference.encode_image(pixels, normalize=True), atol=ATOL)
        assert torch.allclose(model.encode_text(**batch),
                              reference.encode_text(open_clip.tokenize(CAPTIONS), normalize=True), atol=ATOL)


def test_clip_matches_transformers(clip_source: tuple[Any, Path, Path]) -> None:
    reference, src, out = clip_source
    check_report(out)
    from transformers import AutoTokenizer

    ids = hf_ids(AutoTokenizer.from_pretrained(src))
    assert torch.equal(vlp_ids(out)["input_ids"], ids["input_ids"])
    model, _, _ = vlp.load(out)
    pixels = images()
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"].long())
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(**ids)
        assert torch.allclose(image_emb, unit(expected.image_embeds), atol=ATOL)
        assert torch.allclose(text_emb, unit(expected.text_embeds), atol=ATOL)
        assert torch.allclose(model.logit_scale() * image_emb @ text_emb.T, expected.logits_per_image, atol=1e-4)
    assert list(model.image_encoder.mean) == pytest.approx([0.4, 0.5, 0.6])
    assert list(model.image_encoder.std) == pytest.approx([0.2] * 3)


def test_forward_logits_equal_transformers_clip(clip_source: tuple[Any, Path, Path]) -> None:
    reference, src, out = clip_source
    from transformers import AutoTokenizer

    ids = hf_ids(AutoTokenizer.from_pretrained(src))
    model, _, _ = vlp.load(out)
    pixels = images()
    with torch.no_grad():
        expected = reference(pixel_values=pixels, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"].long())
        ours = model(pixel_values=pixels, input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    for name in ("logits_per_image", "logits_per_text"):  # CLIPOutput's names and values
        assert torch.allclose(getattr(ours, name), getattr(expected, name), atol=1e-4), name
    assert torch.allclose(ours.image_embeds, unit(expected.image_embeds), atol=ATOL)
    assert model.logit_bias() is None and ours.itm_logits is None


def test_blip_matches_transformers_itc_and_itm(blip_source: tuple[Any, Path, Path]) -> None:
    reference, src, out = blip_source
    report = check_report(out)
    assert set(report["defaulted_vlp_tensors"]) == {"temperature.log_scale"}
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(src)
    ids = hf_ids(hf_tokenizer)
    assert torch.equal(vlp_ids(out)["input_ids"], ids["input_ids"])
    model, _, _ = vlp.load(out)
    pixels, mask = images(), ids["attention_mask"].long()
    with torch.no_grad():
        itc = reference(input_ids=ids["input_ids"], pixel_values=pixels, attention_mask=mask,
                        use_itm_head=False).itm_score
        assert torch.allclose(model.encode_image(pixels) @ model.encode_text(**ids).T, itc, atol=ATOL)
        # BLIP's retrieval model reads [ENC] in the ITM pass; Hugging Face feeds the ids it is given.
        enc_ids = ids["input_ids"].clone()
        enc_ids[:, 0] = hf_tokenizer.get_vocab()["[ENC]"]
        itm = reference(input_ids=enc_ids, pixel_values=pixels, attention_mask=mask).itm_score
        ours = model.itm_logits(pixels, **ids)
        assert torch.allclose(ours, itm, atol=ATOL)
        cls_itm = reference(input_ids=ids["input_ids"], pixel_values=pixels, attention_mask=mask).itm_score
        assert not torch.allclose(ours, cls_itm, atol=1e-3)
    # one BERT stack: the text tower runs the fusion's own layers (shared, not copied, after loading)
    assert model.text_encoder.fusion_layers is model.fusion.text_layers
    assert isinstance(model.image_to_fusion, nn.Identity) and model.fusion.image_dim == 48


def test_vilt_matches_transformers_itm(vilt_source: tuple[Any, Path, Path]) -> None:
    reference, src, out = vilt_source
    check_report(out)
    from transformers import AutoTokenizer

    ids = hf_ids(AutoTokenizer.from_pretrained(src))
    assert torch.equal(vlp_ids(out)["input_ids"], ids["input_ids"])
    model, _, _ = vlp.load(out)
    pixels = images()
    with torch.no_grad():
        score = reference(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"].long(), pixel_values=pixels,
                          pixel_mask=torch.ones(3, 16, 16, dtype=torch.long)).logits[:, 0]
        logits = model.itm_logits(pixels, **ids)
    assert torch.allclose(logits[:, 0], torch.zeros(3)) and torch.allclose(logits[:, 1], score, atol=ATOL)


def test_vilt_model_without_rank_head_matches_pooler(tmp_path: Path) -> None:
    from transformers import ViltConfig, ViltModel

    tokenizer = bert_tokenizer()
    tokenizer.save_pretrained(tmp_path / "hf")
    reference = perturbed(ViltModel(ViltConfig(**{**VISION, "num_hidden_layers": 1}, vocab_size=len(tokenizer),
                                               max_position_embeddings=24)))
    reference.save_pretrained(tmp_path / "hf")
    report = convert("vilt", tmp_path / "hf", tmp_path / "vlp")
    assert report.uninitialized == [] and any("no ITM head" in note for note in report.notes)
    model, _, _ = vlp.load(tmp_path / "vlp")
    ids, pixels = hf_ids(tokenizer), images()
    assert model.itm_head is None
    with torch.no_grad():
        expected = reference(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"].long(),
                             pixel_values=pixels).pooler_output
        fused = model.fuse(model.text_encoder(**ids), model.image_encoder(pixels))
    assert torch.allclose(fused.pooled, expected, atol=ATOL)


def test_siglip_matches_transformers(tmp_path: Path) -> None:
    from open_clip.tokenizer import canonicalize_text
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import SiglipConfig, SiglipModel

    # SigLIP's sentencepiece tokenizer cannot be built offline without sentencepiece: a tiny
    # tokenizer.json with its specials (<pad> 0, </s> 1 = SigLIP's pad and end) stands in, and the same
    # ids go to both models. Its vocabulary holds the canonicalized words only: "triangle." and "A" are
    # known only after vlp's canonicalization.
    canonical = [canonicalize_text(caption) for caption in CAPTIONS]
    vocab = {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>", *sorted(set(" ".join(canonical).split()))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    src = tmp_path / "hf"
    src.mkdir()
    backend.save(str(src / "tokenizer.json"))
    config = SiglipConfig(text_config={**WIDTH, "vocab_size": len(vocab), "max_position_embeddings": 16},
                          vision_config=VISION)
    reference = perturbed(SiglipModel(config))
    reference.save_pretrained(src)
    report = convert("siglip", src, tmp_path / "vlp")
    assert report.unused_source == [] and report.uninitialized == [] and not report.defaulted
    model, tokenizer, _ = vlp.load(tmp_path / "vlp")
    batch = tokenizer(CAPTIONS, max_length=16)
    assert tokenizer.pad_id == 1  # the model's pad_token_id: SigLIP pads every caption to its full length
    assert tokenizer.text_cleaning == "canonicalize" and any("canonicalized" in note for note in report.notes)
    for row, text in enumerate(canonical):
        ids = backend.encode(text).ids
        assert batch["input_ids"][row, : len(ids)].tolist() == ids and 2 not in ids  # no <unk>
    full = torch.nn.functional.pad(batch["input_ids"], (0, 16 - batch["input_ids"].shape[1]), value=1)
    pixels = images()
    with torch.no_grad():
        expected = reference(input_ids=full, pixel_values=pixels)
        image_emb, text_emb = model.encode_image(pixels), model.encode_text(**batch)
        assert torch.allclose(image_emb, unit(expected.image_embeds), atol=ATOL)
        assert torch.allclose(text_emb, unit(expected.text_embeds), atol=ATOL)
        logits = text_emb @ image_emb.T * model.logit_scale() + model.temperature.logit_bias()
        assert torch.allclose(logits, expected.logits_per_text, atol=1e-4)
        ours = model(pixel_values=pixels, **batch)  # forward: SiglipOutput's logits, bias included
    assert torch.allclose(ours.logits_per_text, expected.logits_per_text, atol=1e-4)
    assert torch.allclose(ours.logits_per_image, expected.logits_per_image, atol=1e-4)


# the documented mapping -------------------------------------------------------------------------------


def _module(name: str) -> str:
    return re.sub(r"(\.|(?<=in_proj)_)(weight|bias)$", "", name)


def _documented_rows() -> list[tuple[str, str]]:
    """(source, vlp) rows of docs/convert.md's tables; ``{a,b}`` on the vlp side expands into rows."""
    rows = []
    for line in (ROOT / "docs" / "convert.md").read_text().splitlines():
        cells = [re.findall(r"`([^`]+)`", cell) for cell in line.split("|")[1:-1]]
        if len(cells) != 2 or not cells[0] or not cells[1]:
            continue
        source, target = cells[0][0], cells[1][0]
        match = re.search(r"\{([a-z]+(?:,[a-z]+)+)\}", target)
        options = match.group(1).split(",") if match else [None]
        rows += [(source, target if o is None or match is None else target.replace(match.group(0), o))
                 for o in options]
    return rows


def assert_documented(patterns: list[list[str]] | list[tuple[str, str]]) -> None:
    rows = _documented_rows()

    def covered(source: str, target: str) -> bool:
        for doc_source, doc_target in rows:
            if doc_source.endswith("*") and doc_target.endswith("*"):
                head = doc_source[:-1]
                if source.startswith(head) and target == doc_target[:-1] + source[len(head):]:
                    return True
            elif (doc_source, doc_target) == (source, target):
                return True
        return False

    missing = [f"{s} -> {t}" for s, t in ((_module(s), _module(t)) for s, t in patterns) if not covered(s, t)]
    assert not missing, f"not in docs/convert.md: {missing}"


def test_docs_list_every_mapping_used(clip_source: tuple[Any, Path, Path], blip_source: tuple[Any, Path, Path],
                                      vilt_source: tuple[Any, Path, Path]) -> None:
    for _, _, out in (clip_source, blip_source, vilt_source):
        assert_documented(json.loads((out / "conversion.json").read_text())["mapping"])


# failures ---------------------------------------------------------------------------------------------


def _copy_source(src: Path, dst: Path, edit: Any) -> Path:
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.name != "model.safetensors":
            (dst / path.name).write_bytes(path.read_bytes())
    tensors = safetensors.torch.load_file(str(src / "model.safetensors"))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_mismatched_checkpoint_fails_naming_the_tensors(clip_source: tuple[Any, Path, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    _, src, _ = clip_source

    def edit(tensors: dict[str, torch.Tensor]) -> None:
        del tensors["text_projection.weight"]
        tensors["extra.weight"] = torch.zeros(3)
        tensors["vision_model.post_layernorm.weight"] = torch.ones(31)

    bad = _copy_source(src, tmp_path / "bad", edit)
    with pytest.raises(UserError) as error:
        convert("clip", bad, tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message
    for name in ("missing source tensors: text_projection.weight", "unused source tensors: extra.weight",
                 "image_encoder.visual.ln_post.weight [31] vs [32]"):
        assert name in message
    assert not (tmp_path / "out").exists()
    code = main(["convert", "--from", "clip", str(bad), "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "extra.weight" in err


def test_corrupt_or_wrong_checkpoints_fail_in_one_line(clip_source: tuple[Any, Path, Path], tmp_path: Path) -> None:
    _, src, _ = clip_source
    for name in ("logit_scale", "vision_model.post_layernorm.weight"):
        nan = _copy_source(src, tmp_path / name, lambda t, n=name: t[n].view(-1)[0].fill_(float("nan")))
        with pytest.raises(UserError, match=f"non-finite values in: {name}"):
            convert("clip", nan, tmp_path / "o1")
    truncated = _copy_source(src, tmp_path / "cut", lambda t: None)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"cannot read weights file .*model\.safetensors") as error:
        convert("clip", truncated, tmp_path / "o2")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match=r"model_type 'clip' is not a BLIP model"):
        convert("blip_itm", src, tmp_path / "o3")
    with pytest.raises(UserError, match="not an empty directory"):
        convert("clip", src, src)


# the converted models through vlp's commands ----------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert main(["data", "synth", "--out", str(out), "--train-size", "0", "--test-size", "6",
                 "--image-size", "16"]) == 0
    return out


def test_cli_convert_then_eval_retrieval_and_zeroshot(blip_source: tuple[Any, Path, Path],
                                                      clip_source: tuple[Any, Path, Path], synth: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, src, _ = blip_source
    out = tmp_path / "blip"
    assert main(["convert", "--from", "blip_itm", str(src), "--out", str(out)]) == 0
    assert "unused source tensors: 0; uninitialized vlp tensors: 0" in capsys.readouterr().out
    result_path = tmp_path / "retrieval.json"
    assert main(["eval", "retrieval", "--checkpoint", str(out), "--data", str(synth / "test.json"),
                 "--image-root", str(synth), "--k-test", "3", "--device", "cpu", "--no-progress",
                 "--output", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert {"itc", "itm"} <= set(result) and 0.0 <= result["itm"]["r_mean"] <= 100.0
    for checkpoint, fused in ((out, True), (clip_source[2], False)):
        zeroshot = tmp_path / f"zeroshot_{fused}.json"
        assert main(["eval", "zeroshot", "--checkpoint", str(checkpoint), "--data", str(synth / "zeroshot.json"),
                     "--image-root", str(synth), "--classes", str(synth / "classes.json"), "--device", "cpu",
                     "--no-progress", "--output", str(zeroshot)]) == 0
        assert ("itm_top1" in json.loads(zeroshot.read_text())) == fused


def test_converted_blip_finetunes_with_a_momentum_encoder(blip_source: tuple[Any, Path, Path],
                                                          tmp_path: Path) -> None:
    _, _, out = blip_source
    run = tmp_path / "run"
    assert main(["finetune", "retrieval", str(ROOT / "configs/finetune/retrieval_tiny.yaml"), "--init", str(out),
                 "--output-dir", str(run), "--set", "objective.momentum=0.5"]) == 0
    model, _, _ = vlp.load(run / "final")
    assert model.text_encoder.fusion_layers is model.fusion.text_layers
    before, _, _ = vlp.load(out)
    changed = [not torch.equal(a, b) for a, b in zip(model.fusion.parameters(), before.fusion.parameters())]
    assert any(changed)


def test_cli_source_list_matches_the_converters() -> None:
    import vlp.cli.convert
    import vlp.convert

    assert vlp.cli.convert.SOURCES == vlp.convert.SOURCES
