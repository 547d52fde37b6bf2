"""Tokenizers: CLIP BPE ids equal open_clip's, padding/truncation, mask token, save/load, local sources, errors."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from vlp.config.schema import TextEncoderConfig
from vlp.data.tokenizers import Tokenizer, build_tokenizer, clip_tokenizer, word_tokenizer
from vlp.errors import UserError

CAPTIONS = [
    "A photo of a cat!",
    "Two dogs, playing   in the PARK on a sunny day.",
    "what's 3.14 + 42?? a café, naïve résumé",
    "the man's red-and-white umbrella isn't open",
    "emoji 🐶 and <end_of_text> inside",
    "x",
]
WORDS = ["a", "red", "blue", "cube", "ball", "left", "of", "the", "is", "what", "color"]


@pytest.fixture(scope="module")
def clip() -> Tokenizer:
    return clip_tokenizer()


@pytest.fixture(scope="module")
def words() -> Tokenizer:
    return word_tokenizer(WORDS)


def test_clip_ids_equal_open_clip(clip: Tokenizer) -> None:
    import open_clip

    reference = open_clip.SimpleTokenizer()
    for context in (77, 8):
        ours = clip(CAPTIONS, max_length=context)
        theirs = reference(CAPTIONS, context_length=context)
        length = ours["input_ids"].shape[1]
        assert length == min(context, max(int((row != 0).sum()) for row in theirs))
        assert torch.equal(ours["input_ids"], theirs[:, :length])
        assert torch.equal(ours["attention_mask"].sum(1), (theirs != 0).sum(1))
    assert clip.cls_id == reference.sot_token_id == 49406
    assert {reference.sot_token_id, reference.eot_token_id} < clip.special_ids
    assert clip.pad_id == 0


def test_clip_mask_token_appended(clip: Tokenizer) -> None:
    assert clip.vocab_size == 49409 and clip.mask_id == 49408
    assert clip.mask_id != clip.pad_id and clip.mask_id in clip.special_ids
    assert clip.decode(clip(["a photo of a cat"], 16)["input_ids"][0]) == "a photo of a cat"


def test_word_tokenizer_lowercases_and_splits_punctuation(words: Tokenizer) -> None:
    batch = words(["A RED cube, left of the ball?"], max_length=32)
    tokens = [words.backend.id_to_token(i) for i in batch["input_ids"][0].tolist()]
    assert tokens == ["[CLS]", "a", "red", "cube", ",", "left", "of", "the", "ball", "?", "[SEP]"]
    assert words(["a purple cube"], 8)["input_ids"][0, 2].item() == words.backend.token_to_id("[UNK]")
    assert words.pad_id == 0 and words.mask_id != words.pad_id
    specials = {words.backend.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    assert words.special_ids == frozenset(specials)
    assert words.decode(batch["input_ids"][0]) == "a red cube , left of the ball ?"


def test_padding_to_longest_and_truncation_keeps_sep(words: Tokenizer) -> None:
    texts = ["a red cube", "the blue ball left of the red cube", "a"]
    batch = words(texts, max_length=64)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == (3, 10)  # longest: 8 words + CLS + SEP
    assert mask.sum(1).tolist() == [5, 10, 3]
    assert (ids[~mask] == words.pad_id).all()
    sep = words.backend.token_to_id("[SEP]")
    short = words(texts, max_length=4)
    assert short["input_ids"].shape == (3, 4)
    assert short["input_ids"][:, 0].eq(words.cls_id).all()
    assert short["input_ids"][0, 3].item() == sep and short["input_ids"][1, 3].item() == sep
    assert short["input_ids"][1, 1:3].tolist() == ids[1, 1:3].tolist()
    with pytest.raises(UserError, match="max_length 2"):
        words(texts, max_length=2)


def test_save_load_round_trip(tmp_path: Path, clip: Tokenizer, words: Tokenizer) -> None:
    for name, tokenizer in (("clip", clip), ("words", words)):
        tokenizer.save(tmp_path / name)
        loaded = Tokenizer.load(tmp_path / name)
        for max_length in (64, 6):
            before, after = tokenizer(CAPTIONS, max_length), loaded(CAPTIONS, max_length)
            assert torch.equal(before["input_ids"], after["input_ids"])
            assert torch.equal(before["attention_mask"], after["attention_mask"])
        assert (loaded.pad_id, loaded.mask_id, loaded.cls_id, loaded.special_ids, loaded.vocab_size) == (
            tokenizer.pad_id, tokenizer.mask_id, tokenizer.cls_id, tokenizer.special_ids, tokenizer.vocab_size)
        # a saved directory is also a valid config value
        rebuilt = build_tokenizer(TextEncoderConfig(tokenizer=str(tmp_path / name)))
        assert torch.equal(rebuilt(CAPTIONS, 64)["input_ids"], tokenizer(CAPTIONS, 64)["input_ids"])


# Captions that canonicalization changes: case, punctuation, "_", runs of whitespace, HTML and non-ASCII text.
CANONICAL_CAPTIONS = [
    "A Red  CIRCLE!",
    "the_blue_square, left   of\tthe ball.",
    "  Two shapes;\n(one is RED)  ",
    "what's the colour? it's __blue__",
    "caf\u00e9 &amp; cr\u00e8me: 3.14 + 42",
    "x",
]


def _plain_word_tokenizer(words: set[str], cleaning: str) -> Tokenizer:
    """Word-level ids with no normalizer (case and punctuation reach the vocabulary as they are)."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", *sorted(words)])}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, pad_id=0, mask_id=1, cls_id=0, special_ids=[0, 1], text_cleaning=cleaning)


def test_canonicalize_cleaning_equals_open_clips() -> None:
    from open_clip.tokenizer import basic_clean, canonicalize_text

    from vlp.data.tokenizers import canonical_clean

    # open_clip's `clean: canonicalize` (its SigLIP tokenizers) is canonicalize_text(basic_clean(text))
    reference = [canonicalize_text(basic_clean(caption)) for caption in CANONICAL_CAPTIONS]
    assert [canonical_clean(caption) for caption in CANONICAL_CAPTIONS] == reference
    assert reference[:2] == ["a red circle", "the blue square left of the ball"]
    words = {word for text in reference for word in text.split()}
    canonical, plain = _plain_word_tokenizer(words, "canonicalize"), _plain_word_tokenizer(words, "none")
    expected = [canonical.backend.encode(text).ids for text in reference]
    batch = canonical(CANONICAL_CAPTIONS, max_length=32)
    for row, ids in enumerate(expected):
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert int(batch["attention_mask"][row].sum()) == len(ids)
    assert 1 not in [i for ids in expected for i in ids]  # every canonical word is known
    uncleaned = plain(CANONICAL_CAPTIONS, max_length=32)["input_ids"]
    assert (uncleaned == 1).any()  # without cleaning, "CIRCLE!" and "the_blue_square," are unknown


def test_canonicalize_cleaning_is_saved(tmp_path: Path) -> None:
    tokenizer = _plain_word_tokenizer({"a", "red", "circle"}, "canonicalize")
    tokenizer.save(tmp_path / "t")
    loaded = Tokenizer.load(tmp_path / "t")
    assert loaded.text_cleaning == "canonicalize"
    assert loaded(["A RED_circle!!"], 8)["input_ids"].tolist() == tokenizer(["a red circle"], 8)["input_ids"].tolist()
    with pytest.raises(UserError, match="not one of none, clip, canonicalize"):
        Tokenizer(tokenizer.backend, pad_id=0, mask_id=1, cls_id=0, special_ids=[], text_cleaning="lower")


def test_load_errors_are_one_line(tmp_path: Path, words: Tokenizer) -> None:
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    words.save(tmp_path / "w")
    (tmp_path / "w" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError) as info:
        Tokenizer.load(tmp_path / "w")
    assert "\n" not in str(info.value) and "tokenizer.json" in str(info.value)


def _hf_directory(tmp_path: Path) -> tuple[Path, object]:
    from transformers import BertTokenizer as BertTokenizerFast  # one Rust-backed class in transformers 5

    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ",", "?", "##s"]) + "\n")
    hf = BertTokenizerFast(vocab=str(vocab_file))
    directory = tmp_path / "bert"
    hf.save_pretrained(str(directory))
    return directory, hf


def test_hf_directory_and_tokenizer_json(tmp_path: Path) -> None:
    directory, hf = _hf_directory(tmp_path)
    texts = ["A red cube, left of the balls?", "what color is the cube"]
    expected = hf(texts, padding=True)  # type: ignore[operator]
    for source in (str(directory), str(directory / "tokenizer.json")):
        tokenizer = build_tokenizer(TextEncoderConfig(tokenizer=source))
        batch = tokenizer(texts, 32)
        assert batch["input_ids"].tolist() == expected["input_ids"]
        assert batch["attention_mask"].long().tolist() == expected["attention_mask"]
        assert tokenizer.mask_id == 4 and tokenizer.pad_id == 0 and tokenizer.cls_id == 2
        assert tokenizer.vocab_size == len(WORDS) + 8
    # hf encoders use their model directory's tokenizer when tokenizer is empty or the directory itself
    for value in ("", str(directory)):
        tokenizer = build_tokenizer(TextEncoderConfig(type="hf", name=str(directory), tokenizer=value))
        assert tokenizer(texts, 32)["input_ids"].tolist() == expected["input_ids"]


def test_mask_appended_when_missing(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "cube": 4}
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    backend.save(str(tmp_path / "plain.json"))
    tokenizer = build_tokenizer(TextEncoderConfig(tokenizer=str(tmp_path / "plain.json")))
    assert tokenizer.vocab_size == 6 and tokenizer.mask_id == 5
    assert tokenizer.backend.id_to_token(tokenizer.mask_id) == "<|mask|>"
    assert tokenizer.special_ids == frozenset({0, 1, 2, 3, 5}) and tokenizer.cls_id == 2


def test_names_that_would_download_fail() -> None:
    for name in ("bert-base-uncased", "openai/clip-vit-base-patch32"):
        with pytest.raises(UserError) as info:
            build_tokenizer(TextEncoderConfig(tokenizer=name))
        assert name in str(info.value) and "never downloads" in str(info.value)
    with pytest.raises(UserError, match="not a local model directory|never downloads"):
        build_tokenizer(TextEncoderConfig(type="hf", name="bert-base-uncased", tokenizer=""))
    with pytest.raises(UserError, match="empty"):
        build_tokenizer(TextEncoderConfig(tokenizer=""))


def test_synthetic_uses_the_dataset_words(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("vlp.data.synthetic")
    fake.SYNTHETIC_WORDS = ["Cube", "ball", "left"]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vlp.data.synthetic", fake)
    tokenizer = build_tokenizer(TextEncoderConfig(tokenizer="synthetic"))
    ids = tokenizer(["cube left ball"], 8)["input_ids"][0].tolist()
    assert [tokenizer.backend.id_to_token(i) for i in ids] == ["[CLS]", "cube", "left", "ball", "[SEP]"]


def test_real_synthetic_words_are_all_known() -> None:
    synthetic = pytest.importorskip("vlp.data.synthetic")
    tokenizer = build_tokenizer(TextEncoderConfig(tokenizer="synthetic"))
    ids = tokenizer([" ".join(synthetic.SYNTHETIC_WORDS)], 100_000)["input_ids"]
    assert tokenizer.backend.token_to_id("[UNK]") not in ids.tolist()[0]
