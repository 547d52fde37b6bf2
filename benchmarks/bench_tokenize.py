"""Caption tokenization: vlp's default path (Rust ``tokenizers``, batch encoding) vs open_clip's SimpleTokenizer.

Both tokenize the same captions with the same BPE vocabulary (open_clip's bundled one) to 77 tokens, and
every caption's ids must be identical (vlp pads to the longest caption; its rows are padded to 77 with 0
as open_clip's are). Target: vlp >= 2x open_clip's captions/s with 2 threads; 1 thread is reported too
(Rust's thread pool off: emulated as a user who set TOKENIZERS_PARALLELISM=false before importing
open_clip). open_clip itself is single-threaded Python.

Captions are generated from a seed: Zipf-distributed words of the BPE vocabulary with capitals,
punctuation, digits and contractions, plus a few percent with accents, curly quotes, emoji, CJK,
HTML entities, mojibake, control characters, and over-long captions (truncation).

    python benchmarks/bench_tokenize.py [--size tiny|quick|full] [--reps N]
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import torch
import torch.nn.functional as F
from common import Report, base_parser, interleaved, median, paired_ratio, setup, sizes_for

SIZES = {
    "tiny": {"captions": 300, "reps": 1},
    "quick": {"captions": 20_000, "reps": 3},
    "full": {"captions": 100_000, "reps": 5},
}
CONTEXT = 77
TARGET = 2.0
ODD_PIECES = (
    "café", "naïve", "“quoted”", "‘single’", "—", "…", "北京の猫", "😀", "🐱 cat", "Ünïcödé", "ﬁsh", "ｆｕｌｌ", "cafÃ©",
    "it&#39;s", "fish &amp; chips", "a &lt;b&gt;", "tab\there", "bell\x07", "zero\u200bwidth", "x\u00a0y",
)


def make_captions(count: int, words: list[str], seed: int = 0) -> list[str]:
    """``count`` varied captions (see the module docstring), deterministic for a seed."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 50) for rank in range(len(words))]  # Zipf-like: frequent words first
    captions = []
    for _ in range(count):
        long = rng.random() < 0.01
        picked = rng.choices(words, weights, k=rng.randint(60, 120) if long else rng.randint(3, 30))
        roll = rng.random()
        if roll < 0.06:
            picked.insert(rng.randrange(len(picked) + 1), rng.choice(ODD_PIECES))
        elif roll < 0.16:
            picked.insert(rng.randrange(len(picked) + 1), rng.choice(["it's", "don't", "we'll", "3", "1990", "2.5"]))
        text = " ".join(picked)
        if rng.random() < 0.5:
            text = text[0].upper() + text[1:] + rng.choice([".", "!", "?", "", " ..."])
        if rng.random() < 0.1:
            text = text.replace(" ", ", ", 1)
        captions.append(text)
    return captions


def main(argv: list[str] | None = None) -> int:
    import open_clip  # noqa: F401  (its import sets TOKENIZERS_PARALLELISM=false, as in a user's process)
    from open_clip.tokenizer import SimpleTokenizer

    import vlp.data.tokenizers as vlp_tokenizers

    parser = base_parser(__doc__.splitlines()[0])
    args = parser.parse_args(argv)
    cfg = sizes_for(args.size, SIZES)
    reps = args.reps or cfg["reps"]
    settings = setup(args)
    settings["rayon_threads"] = os.environ.get("RAYON_NUM_THREADS", f"default ({os.cpu_count()} logical CPUs)")
    report = Report("bench_tokenize", args, {**settings, **cfg, "reps": reps})

    reference = SimpleTokenizer()
    ours = vlp_tokenizers.clip_tokenizer()
    words = [token[:-4] for token in reference.encoder if token.endswith("</w>") and token[:-4].isascii() and token[:-4].isalpha()]
    captions = make_captions(cfg["captions"], words)
    needs_cleaning = sum(1 for text in captions if vlp_tokenizers.clip_clean(text) != text)

    def vlp_parallel() -> Any:
        return ours(captions, CONTEXT)

    def vlp_single() -> Any:
        user_setting = vlp_tokenizers._USER_PARALLELISM
        vlp_tokenizers._USER_PARALLELISM = "false"
        try:
            return ours(captions, CONTEXT)
        finally:
            vlp_tokenizers._USER_PARALLELISM = user_setting

    def open_clip_call() -> Any:
        return reference(captions, context_length=CONTEXT)

    expected = open_clip_call()  # also warms open_clip's BPE cache, as the warm-up round warms Rust's
    batch = vlp_parallel()
    ids = F.pad(batch["input_ids"], (0, CONTEXT - batch["input_ids"].shape[1]), value=0)
    mismatched = int((ids != expected).any(dim=1).sum())
    report.detail("mismatched_examples", [captions[i] for i in (ids != expected).any(dim=1).nonzero()[:5, 0].tolist()])

    times = interleaved({"vlp_2_threads": vlp_parallel, "vlp_1_thread": vlp_single, "open_clip": open_clip_call},
                        reps, warmup=0)
    report.detail("times_seconds", {k: [round(t, 4) for t in v] for k, v in times.items()})
    count = len(captions)
    report.figure("identical_ids", float(mismatched == 0), "(1 = every caption's ids equal open_clip's)", 1.0,
                  note=f"{mismatched} of {count} captions differ; {needs_cleaning} went through ftfy/HTML cleaning")
    report.figure("speedup_2_threads", paired_ratio(times["open_clip"], times["vlp_2_threads"]),
                  "x open_clip captions/s", TARGET)
    report.figure("speedup_1_thread", paired_ratio(times["open_clip"], times["vlp_1_thread"]),
                  "x open_clip captions/s")
    for name, measured in times.items():
        report.figure(f"{name}_captions_per_s", count / median(measured), "captions/s")
    report.detail("torch_threads", torch.get_num_threads())
    report.write()
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
