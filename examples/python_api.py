"""vlp from Python: pretrain a config, load the checkpoint, score image-text pairs, evaluate retrieval.

The same steps as ``vlp pretrain`` and ``vlp eval retrieval``, on the tiny demo config (a 1-layer ALBEF-style
model on the embedded synthetic data), so it finishes in seconds on a CPU. A model trained for 20 steps
still scores a scene's own caption and another scene's caption almost alike, and its recall is near chance;
``--checkpoint runs/demo/final`` skips the training and scores with the checkpoint ``make demo`` wrote.

Run: python examples/python_api.py [--out DIR] [--checkpoint DIR]
(--out keeps the run there instead of in a temporary directory that is removed afterwards)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import vlp
from vlp.config import load_config
from vlp.config.schema import EvalConfig
from vlp.data.retrieval_split import synthetic_retrieval_split
from vlp.data.synthetic import SyntheticScenes
from vlp.eval.retrieval import evaluate_retrieval
from vlp.train import pretrain

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "demo_tiny.yaml"


def train(out: Path) -> Path:
    """Pretrain: a YAML file plus --set style overrides, exactly what `vlp pretrain` does."""
    config = load_config(CONFIG, overrides=["train.max_steps=20", "train.checkpoint_every=10"])
    run_dir = pretrain(config, output_dir=out / "run")
    print(f"run directory: {run_dir}")
    print("run contents:", ", ".join(sorted(p.name for p in run_dir.iterdir())))
    print("checkpoints:", ", ".join(sorted(p.name for p in (run_dir / "checkpoints").iterdir())))
    return run_dir / "final"


def run(out: Path, checkpoint: Path | None) -> None:
    # 1. Pretrain, unless a checkpoint is given.
    checkpoint = checkpoint if checkpoint is not None else train(out)

    # 2. Load the checkpoint: model, its tokenizer and its evaluation image transform.
    model, tokenizer, transform = vlp.load(checkpoint)

    # 3. Score one image against its own caption and another scene's caption.
    scenes = SyntheticScenes(8, seed=0, split="test", image_size=model.image_encoder.image_size)
    image_path = out / "scene0.png"
    scenes.render(0).save(image_path)  # any RGB image file works the same way
    from PIL import Image

    pixels = transform(Image.open(image_path).convert("RGB"))  # [3, H, W], normalized as in training
    captions = [scenes.captions(0)[0], scenes.captions(1)[0]]
    tokens = tokenizer(captions, max_length=model.config.text.max_length)
    images = pixels[None].expand(len(captions), -1, -1, -1)
    with torch.no_grad():
        cosine = (model.encode_image(images) * model.encode_text(tokens["input_ids"], tokens["attention_mask"])).sum(-1)
        match = model.itm_logits(images, tokens["input_ids"], tokens["attention_mask"]).softmax(-1)[:, 1]
    for caption, itc, itm in zip(captions, cosine.tolist(), match.tolist()):
        print(f"ITC cosine {itc:+.3f}  ITM match probability {itm:.3f}  '{caption}'")

    # 4. Retrieval on held-out images: ITC ranking, then ITM re-ranking of each query's top k_test.
    split = synthetic_retrieval_split(scenes)
    result = evaluate_retrieval(model, split, transform, EvalConfig(k_test=4), progress=False)
    print(f"retrieval on {result['num_images']} images / {result['num_texts']} captions: "
          f"ITC r_mean {result['itc']['r_mean']:.1f}, ITM re-ranked r_mean {result['itm']['r_mean']:.1f}")
    print("python api example: OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=None, help="keep the run here instead of a temp dir")
    parser.add_argument("--checkpoint", type=Path, default=None, help="score with this checkpoint, no training")
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.out, args.checkpoint)
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.checkpoint)


if __name__ == "__main__":
    main()
