"""Held-out retrieval splits (Karpathy style: one image, several captions) and batched image loading."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from torch.utils.data import Dataset

from vlp.data.csv_records import CsvFormat
from vlp.data.datasets import captions_of_record, read_pair_records
from vlp.data.synthetic import SyntheticScenes
from vlp.data.transforms import ImageTransform, open_image
from vlp.errors import UserError

__all__ = ["RetrievalSplit", "load_retrieval_split", "synthetic_retrieval_split",
           "ImageDataset", "ImageFiles", "load_image_file", "check_images_exist"]


def load_image_file(path: str | Path) -> Image.Image:
    """An evaluation image as RGB; unlike in training, an unreadable one is an error (it biases scores)."""
    try:
        return open_image(path)
    except FileNotFoundError:
        raise UserError(f"image not found: {path}") from None
    except Exception as err:  # Pillow plugins raise many exception types on corrupt files
        raise UserError(f"unreadable image {path}: {type(err).__name__}: {err}") from None


def check_images_exist(paths: list[Path], data_file: str | Path) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise UserError(f"{data_file}: image not found: {missing[0]} "
                        f"({len(missing)} of {len(paths)} missing)")


class ImageFiles:
    """index -> RGB image of ``paths[index]`` (picklable, for DataLoader workers)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __call__(self, index: int) -> Image.Image:
        return load_image_file(self.paths[index])


@dataclass
class RetrievalSplit:
    """Images (``load_image(i)``, i < ``num_images``) and all their captions, flattened.

    ``txt2img[t]`` is caption t's image; ``img2txt[i]`` lists image i's captions.
    """

    load_image: Callable[[int], Image.Image]
    num_images: int
    captions: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]
    image_paths: list[Path] | None = None

    def first(self, num_images: int) -> RetrievalSplit:
        """The first ``num_images`` images with their captions (all images when 0 or more than there are)."""
        if num_images <= 0 or num_images >= self.num_images:
            return self
        img2txt = self.img2txt[:num_images]
        kept = [t for texts in img2txt for t in texts]
        new_index = {t: k for k, t in enumerate(kept)}
        return RetrievalSplit(self.load_image, num_images, [self.captions[t] for t in kept],
                              [self.txt2img[t] for t in kept],
                              [[new_index[t] for t in texts] for texts in img2txt],
                              None if self.image_paths is None else self.image_paths[:num_images])


def _from_groups(load_image: Callable[[int], Image.Image], groups: list[list[str]],
                 paths: list[Path] | None = None) -> RetrievalSplit:
    captions: list[str] = []
    txt2img: list[int] = []
    img2txt: list[list[int]] = []
    for image_index, texts in enumerate(groups):
        img2txt.append(list(range(len(captions), len(captions) + len(texts))))
        captions += texts
        txt2img += [image_index] * len(texts)
    return RetrievalSplit(load_image, len(groups), captions, txt2img, img2txt, paths)


def load_retrieval_split(path: str | Path, image_root: str | Path,
                         csv_format: CsvFormat | None = None) -> RetrievalSplit:
    """JSON list or JSONL of ``{"image", "caption"}`` (caption a string or a list), or a CSV/TSV table (one
    caption per row, read with ``csv_format``); records naming the same image are merged, images keep their
    order of first appearance. Every image file must exist."""
    path, root = Path(path), Path(image_root)
    groups: dict[str, list[str]] = {}
    for location, record in read_pair_records(path, csv_format):
        image = record.get("image")
        if not isinstance(image, str) or not image:
            raise UserError(f"{path}: {location}: 'image' must be a non-empty string (a path)")
        captions = captions_of_record(record, path, location)
        groups.setdefault(image, []).extend(" ".join(c.split()) for c in captions)
    if not groups:
        raise UserError(f"{path}: no images")
    paths = [root / image for image in groups]
    check_images_exist(paths, path)
    return _from_groups(ImageFiles(paths), list(groups.values()), paths)


def synthetic_retrieval_split(scenes: SyntheticScenes) -> RetrievalSplit:
    """The in-memory synthetic split: every image with its ``scenes.num_captions`` paraphrases."""
    return _from_groups(scenes.render, [list(scenes.captions(i)) for i in range(len(scenes))])


class ImageSource(Protocol):
    @property
    def load_image(self) -> Callable[[int], Image.Image]: ...

    @property
    def num_images(self) -> int: ...


class ImageDataset(Dataset[dict[str, Any]]):
    """The images of a split (anything with ``load_image`` and ``num_images``) for batched encoding:
    yields ``{"image": Tensor [3,H,W], "index": int}``."""

    def __init__(self, split: ImageSource, transform: ImageTransform) -> None:
        self.split = split
        self.transform = transform

    def __len__(self) -> int:
        return self.split.num_images

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.transform(self.split.load_image(index)), "index": index}

