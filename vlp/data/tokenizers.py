"""Tokenizers: one ``Tokenizer`` class over a Rust ``tokenizers.Tokenizer``, built from a config.

Sources (``TextEncoderConfig.tokenizer``):

- ``synthetic``: a word-level vocabulary of the embedded synthetic dataset, BERT-style
  ``[CLS] ... [SEP]`` with ``[PAD]`` = 0, ``[UNK]`` and ``[MASK]``; text is lowercased and split on
  whitespace and punctuation.
- ``clip``: open_clip's bundled BPE vocabulary (``bpe_simple_vocab_16e6.txt.gz``) as a Rust BPE that
  gives the same ids as ``open_clip.SimpleTokenizer`` (start/end of text 49406/49407, pad 0 as
  open_clip pads). BPE has no mask token, so ``<|mask|>`` is appended: ``vocab_size`` is 49409, one more
  than open_clip's embedding table. open_clip's text cleaning (ftfy repair, HTML unescaping) runs only on
  the captions that need it (non-ASCII, control characters or '&'), so the ids equal open_clip's for all text.
- a local path: a ``tokenizer.json`` file, a directory written by ``Tokenizer.save``, or a Hugging Face
  tokenizer directory (loaded with ``local_files_only=True``). A mask token is appended if missing.
- ``type: hf`` with ``tokenizer`` empty or equal to ``name``: the model directory's own tokenizer, so
  configs that use a local Hugging Face model set ``tokenizer`` to that directory (or leave it empty).

Nothing is downloaded: any other value is a ``UserError``.

Text cleaning before tokenizing (``text_cleaning``, saved with the tokenizer): ``none``; ``clip`` (open_clip's
BPE tokenizer); ``canonicalize`` (open_clip's ``clean: canonicalize``, what SigLIP was trained with; set by
the SigLIP conversions).
"""

from __future__ import annotations

import contextlib
import html
import itertools
import json
import os
import re
import string
import sys
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer
from torch import Tensor

from vlp.config.schema import TextEncoderConfig
from vlp.errors import UserError, one_line

__all__ = ["Tokenizer", "build_tokenizer", "word_tokenizer"]

BACKEND_FILE = "tokenizer.json"
SPECIALS_FILE = "vlp_tokenizer.json"
FORMAT_VERSION = 1
APPENDED_MASK = "<|mask|>"
WORD_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# open_clip's own split pattern (its specials first), applied to lowercased text.
CLIP_PATTERN = r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# Text that open_clip's cleaning can change beyond case and whitespace (which the Rust side handles).
_NEEDS_CLIP_CLEANING = re.compile(r"[^\t\n\r\x20-\x7e]|&")
BPE_CACHE_WORDS = 1 << 17  # the Rust default (10k words) misses often on caption vocabularies
_PARALLELISM = "TOKENIZERS_PARALLELISM"
# open_clip's import overwrites TOKENIZERS_PARALLELISM with "false"; a value set before that import is the user's.
_USER_PARALLELISM = None if "open_clip" in sys.modules else os.environ.get(_PARALLELISM)
_IMPORT_PID = os.getpid()


TEXT_CLEANINGS = ("none", "clip", "canonicalize")


def clip_clean(text: str) -> str:
    """open_clip's cleaning (ftfy repair, HTML unescaped twice, whitespace collapsed, lowercased) of one caption.

    Printable ASCII without '&' is returned unchanged: cleaning would only collapse whitespace and lowercase it,
    and the Rust split drops whitespace and its normalizer lowercases; skipping ftfy there is most of the speed
    of batch tokenization.
    """
    if not _NEEDS_CLIP_CLEANING.search(text):
        return text
    import ftfy  # open_clip's own dependency

    cleaned = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(cleaned.split()).lower()


def canonical_clean(text: str) -> str:
    """open_clip's ``clean: canonicalize`` of one caption (its SigLIP tokenizers): the ftfy/HTML repair of
    ``clip_clean`` where the text needs it, then ``open_clip.tokenizer.canonicalize_text`` (``_`` to a space,
    ASCII punctuation removed, lowercased, whitespace collapsed)."""
    from open_clip.tokenizer import canonicalize_text

    if _NEEDS_CLIP_CLEANING.search(text):
        import ftfy

        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return str(canonicalize_text(text))


@contextlib.contextmanager
def rust_parallelism() -> Iterator[None]:
    """Let ``encode_batch`` use Rust's thread pool although importing open_clip set TOKENIZERS_PARALLELISM=false.

    Kept off when the user set it false before that import, and in a forked child of this process (Rust's
    pool does not survive a fork; the tokenizers library itself turns parallelism off there).
    """
    user_off = _USER_PARALLELISM is not None and _USER_PARALLELISM.lower() in ("", "0", "false", "f", "off", "no", "n")
    current = os.environ.get(_PARALLELISM)
    if user_off or os.getpid() != _IMPORT_PID or current is None or current.lower() == "true":
        yield
        return
    os.environ[_PARALLELISM] = "true"
    try:
        yield
    finally:
        os.environ[_PARALLELISM] = current


class Tokenizer:
    """A Rust tokenizer plus the special ids vlp needs; batches are padded to their longest caption.

    ``special_ids`` are the ids MLM must never mask (CLS/SEP/BOS/EOS, PAD when it is a dedicated token,
    UNK, MASK). Always use the returned ``attention_mask``: for ``clip`` the pad id 0 is also the
    ordinary token ``!``, exactly as in open_clip.
    """

    def __init__(self, backend: RustTokenizer, pad_id: int, mask_id: int, cls_id: int,
                 special_ids: Iterable[int], text_cleaning: str = "none") -> None:
        if text_cleaning not in TEXT_CLEANINGS:
            raise UserError(f"tokenizer text_cleaning '{text_cleaning}' is not one of {', '.join(TEXT_CLEANINGS)}")
        self.backend = backend
        self.pad_id = pad_id
        self.mask_id = mask_id
        self.cls_id = cls_id
        self.special_ids = frozenset(special_ids) | {mask_id}
        self.text_cleaning = text_cleaning
        if backend.id_to_token(pad_id) is None:
            raise UserError(f"tokenizer pad id {pad_id} is not in its vocabulary")
        # Padding is done here in numpy: building tensors from padded per-caption lists cost more than encoding.
        backend.no_padding()
        backend.no_truncation()
        resize_cache = getattr(backend.model, "_resize_cache", None)  # BPE models (not kept in tokenizer.json)
        if resize_cache is not None:
            resize_cache(BPE_CACHE_WORDS)
        self._max_length: int | None = None
        self.unk_id = _unknown_id(backend)
        self._structural = torch.tensor(sorted(self.special_ids - {self.unk_id}), dtype=torch.long)
        # The longest input of the model this tokenizer serves (Hugging Face's name): the default max_length.
        # build_model sets it from model.text.max_length, so a loaded checkpoint's tokenizer knows it.
        self.model_max_length: int | None = None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def __call__(self, texts: Sequence[str] | str, max_length: int | None = None) -> dict[str, Tensor]:
        """Token ids [B, T] (long) and attention mask [B, T] (bool, True = real), T = min(longest, max_length).

        ``max_length`` defaults to ``model_max_length`` (the checkpoint's ``model.text.max_length``).
        Truncation keeps the final SEP/EOT token, as Hugging Face and open_clip do.
        """
        if max_length is None:
            if self.model_max_length is None:
                raise UserError("this tokenizer belongs to no model: pass max_length")
            max_length = self.model_max_length
        batch = [texts] if isinstance(texts, str) else list(texts)
        if max_length != self._max_length:
            added = self.backend.num_special_tokens_to_add(is_pair=False)
            if max_length <= added:
                raise UserError(f"max_length {max_length} leaves no room for text after {added} special tokens")
            self.backend.enable_truncation(max_length)
            self._max_length = max_length
        if self.text_cleaning == "clip":
            batch = [clip_clean(text) for text in batch]
        elif self.text_cleaning == "canonicalize":
            batch = [canonical_clean(text) for text in batch]
        with rust_parallelism():
            encodings = self.backend.encode_batch_fast(batch)  # offsets are not needed
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        longest = int(lengths.max()) if len(ids) else 0
        attention_mask = np.arange(longest)[None, :] < lengths[:, None]
        input_ids = np.full((len(ids), longest), self.pad_id, dtype=np.int64)
        input_ids[attention_mask] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64,
                                                count=int(lengths.sum()))
        return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}

    def count_unknown(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[int, int]:
        """(unknown tokens, word tokens) of a batch: word tokens are the real ones that are not special
        (CLS/SEP/BOS/EOS/MASK), unknown ones those that are the vocabulary's unknown token."""
        real = attention_mask.bool()
        words = real & ~torch.isin(input_ids, self._structural.to(input_ids.device))
        unknown = (real & (input_ids == self.unk_id)) if self.unk_id is not None else torch.zeros(())
        return int(unknown.sum()), int(words.sum())

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Text of one sequence (trailing padding allowed), special tokens skipped."""
        id_list = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        while id_list and id_list[-1] == self.pad_id:  # padding follows the final SEP/EOT
            id_list.pop()
        text = self.backend.decode(id_list, skip_special_tokens=True)
        suffix = getattr(self.backend.model, "end_of_word_suffix", None)
        if suffix:  # CLIP's BPE marks word ends instead of spaces
            text = text.replace(suffix, " ")
        return " ".join(text.split())

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` (the Rust tokenizer) and ``vlp_tokenizer.json`` (the special ids)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(out / BACKEND_FILE))
        specials = {"format": FORMAT_VERSION, "pad_id": self.pad_id, "mask_id": self.mask_id,
                    "cls_id": self.cls_id, "special_ids": sorted(self.special_ids),
                    "text_cleaning": self.text_cleaning}
        (out / SPECIALS_FILE).write_text(json.dumps(specials, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a directory written by ``save``."""
        root = Path(directory)
        backend_path, specials_path = root / BACKEND_FILE, root / SPECIALS_FILE
        for path in (backend_path, specials_path):
            if not path.is_file():
                raise UserError(f"tokenizer directory {root} has no {path.name}")
        try:
            specials: dict[str, Any] = json.loads(specials_path.read_text())
            ids = [int(specials[key]) for key in ("pad_id", "mask_id", "cls_id")]
            special_ids = [int(i) for i in specials["special_ids"]]
            cleaning = str(specials.get("text_cleaning", "none"))  # absent in files from before it existed
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"cannot read {specials_path}: {one_line(error)}") from error
        try:
            backend = RustTokenizer.from_file(str(backend_path))
        except Exception as error:  # the Rust loader raises plain Exception on malformed files
            raise UserError(f"cannot read {backend_path}: {one_line(error)}") from error
        return cls(backend, pad_id=ids[0], mask_id=ids[1], cls_id=ids[2], special_ids=special_ids,
                   text_cleaning=cleaning)


def _unknown_id(backend: RustTokenizer) -> int | None:
    """The id words outside the vocabulary become, or None: byte-level BPE (CLIP) has no unknown words, and
    names its end-of-text token as unknown, so a token that every encoding carries is not counted."""
    token = getattr(backend.model, "unk_token", None)
    unk_id = backend.token_to_id(token) if token else None
    if unk_id is None or unk_id in backend.encode("").ids:
        return None
    return int(unk_id)


def word_tokenizer(words: Iterable[str]) -> Tokenizer:
    """A word-level tokenizer over ``words`` (lowercased) plus ASCII punctuation; [PAD]=0, [UNK], [CLS], [SEP], [MASK]."""
    vocab = {token: index for index, token in enumerate(WORD_SPECIALS)}
    for word in sorted({w.lower() for w in words} | set(string.punctuation)):
        vocab.setdefault(word, len(vocab))
    backend = RustTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.add_special_tokens([AddedToken(t, special=True) for t in WORD_SPECIALS])
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return Tokenizer(backend, pad_id=vocab["[PAD]"], mask_id=vocab["[MASK]"], cls_id=vocab["[CLS]"],
                     special_ids=[vocab[t] for t in WORD_SPECIALS])


@lru_cache(maxsize=1)
def _clip_backend_json() -> str:
    # Derived once per process from open_clip's own parse of its bundled vocabulary.
    import open_clip
    from transformers import CLIPTokenizer

    simple = open_clip.SimpleTokenizer()
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.__getitem__)
    sot, eot = "<start_of_text>", "<end_of_text>"
    hf = CLIPTokenizer(vocab=dict(simple.encoder), merges=merges, unk_token=eot, bos_token=sot,
                       eos_token=eot, pad_token=eot)
    backend: RustTokenizer = hf.backend_tokenizer
    # Whitespace never reaches a token (the split drops it) and only non-ASCII text can change under NFC,
    # which clip_clean applies with ftfy: lowercasing is all the Rust side still has to do.
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        # The split above already gives the words; ByteLevel's own regex pass would only cost time.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    if backend.token_to_id(sot) != simple.sot_token_id or backend.token_to_id(eot) != simple.eot_token_id:
        raise RuntimeError("open_clip's BPE vocabulary changed layout: start/end of text ids differ")
    backend.add_special_tokens([AddedToken(APPENDED_MASK, special=True)])
    return str(backend.to_str())


def clip_tokenizer() -> Tokenizer:
    """open_clip's BPE (same ids as ``open_clip.SimpleTokenizer``) with ``<|mask|>`` appended (id 49408)."""
    backend = RustTokenizer.from_str(_clip_backend_json())
    sot, eot, mask = (_token_id(backend, t) for t in ("<start_of_text>", "<end_of_text>", APPENDED_MASK))
    return Tokenizer(backend, pad_id=0, mask_id=mask, cls_id=sot, special_ids=[sot, eot, mask], text_cleaning="clip")


def _token_id(backend: RustTokenizer, token: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise UserError(f"tokenizer has no token '{token}'")
    return int(token_id)


def _with_mask(backend: RustTokenizer, mask_id: int | None) -> int:
    if mask_id is not None:
        return int(mask_id)
    backend.add_special_tokens([AddedToken(APPENDED_MASK, special=True)])
    return _token_id(backend, APPENDED_MASK)


def _first_present(backend: RustTokenizer, names: Sequence[str]) -> int | None:
    for name in names:
        token_id = backend.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    return None


def _from_tokenizer_json(path: Path) -> Tokenizer:
    try:
        backend = RustTokenizer.from_file(str(path))
    except Exception as error:  # the Rust loader raises plain Exception on malformed files
        raise UserError(f"cannot read tokenizer file {path}: {one_line(error)}") from error
    special = [i for i, token in backend.get_added_tokens_decoder().items() if token.special]
    pad = _first_present(backend, ["[PAD]", "<pad>", "<|pad|>", "<|endoftext|>", "</s>"])
    cls = _first_present(backend, ["[CLS]", "<s>", "<|startoftext|>", "<bos>", "<|begin_of_text|>"])
    mask = _with_mask(backend, _first_present(backend, ["[MASK]", "<mask>", APPENDED_MASK]))
    pad_id = 0 if pad is None else pad
    return Tokenizer(backend, pad_id=pad_id, mask_id=mask, cls_id=pad_id if cls is None else cls,
                     special_ids=special)


def _from_hf_directory(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    try:  # trust_remote_code=False: never import a directory's own tokenizer code (and never prompt for it)
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as error:
        if "trust_remote_code" in str(error):
            raise UserError(f"refused: tokenizer {path} needs its own Python code (custom code); "
                            "vlp never runs code from model directories") from error
        raise UserError(f"cannot load a Hugging Face tokenizer from {path}: {one_line(error)}") from error
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, RustTokenizer):
        raise UserError(f"tokenizer in {path} has no fast (Rust) backend; save it with a tokenizer.json")
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    cls = hf.cls_token_id if hf.cls_token_id is not None else hf.bos_token_id
    mask = _with_mask(backend, hf.mask_token_id)
    pad_id = 0 if pad is None else int(pad)
    return Tokenizer(backend, pad_id=pad_id, mask_id=mask, cls_id=pad_id if cls is None else int(cls),
                     special_ids=[int(i) for i in hf.all_special_ids])


def load_tokenizer(location: str) -> Tokenizer:
    """A tokenizer from a local ``tokenizer.json``, a ``Tokenizer.save`` directory or a Hugging Face directory."""
    path = Path(location).expanduser()
    if path.is_file():
        return _from_tokenizer_json(path)
    if path.is_dir():
        if (path / SPECIALS_FILE).is_file():
            return Tokenizer.load(path)
        return _from_hf_directory(path)
    raise UserError(
        f"tokenizer '{location}' is not 'synthetic', 'clip' or a local path (tokenizer.json or a directory); "
        "vlp never downloads tokenizers")


def build_tokenizer(cfg: TextEncoderConfig) -> Tokenizer:
    """The tokenizer that ``cfg`` names (see the module docstring for the accepted values)."""
    source = cfg.tokenizer
    if cfg.type == "hf" and cfg.name and source in ("", cfg.name):
        return load_tokenizer(cfg.name)
    if source == "synthetic":
        from vlp.data.synthetic import SYNTHETIC_WORDS

        return word_tokenizer(SYNTHETIC_WORDS)
    if source == "clip":
        return clip_tokenizer()
    if not source:
        raise UserError("text.tokenizer is empty: use 'synthetic', 'clip' or a local tokenizer path")
    return load_tokenizer(source)
