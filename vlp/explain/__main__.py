"""``python -m vlp.explain CHECKPOINT``: print the localization ratio of a checkpoint's explanation maps on the
synthetic test scenes (the number the docs quote for the demo)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vlp.errors import UserError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    from vlp.data.synthetic import SyntheticScenes
    from vlp.explain.localization import localization_ratio
    from vlp.models import VLPModel

    parser = argparse.ArgumentParser(prog="python -m vlp.explain", description=__doc__)
    parser.add_argument("checkpoint")
    parser.add_argument("--n-images", type=int, default=200, help="synthetic test scenes to explain")
    parser.add_argument("--layer", type=int, default=None, help="fusion layer (default the second-to-last)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic test split")
    args = parser.parse_args(argv)
    try:
        model = VLPModel.from_pretrained(args.checkpoint)
        scenes = SyntheticScenes(args.n_images, seed=args.seed, split="test",
                                 image_size=model.image_encoder.image_size)
        ratio = localization_ratio(model, scenes, n_images=args.n_images, layer=args.layer)
    except UserError as err:
        print(f"vlp: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": args.checkpoint, "n_images": args.n_images, "localization_ratio": ratio}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
