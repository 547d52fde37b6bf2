"""Reading benchmark files as released: JSON/JSONL annotations, text lists, image folders, and CLIP_benchmark's
webdataset layout (``DIR/SPLIT/nshards.txt`` + ``DIR/SPLIT/{0..n-1}.tar``).

webdataset 1.0.2 splits shards by node (``single_node_only`` raises under torchrun) and by DataLoader worker
and fails on an empty split (``empty_check``); a test split read in full by every rank needs none of that, so
``read_wds`` turns all three off and reads every shard in order: sample i is the i-th sample of the
concatenated shards on every rank, which then shards the work by that index.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from vlp.data.retrieval_split import load_image_file
from vlp.data.transforms import open_image
from vlp.errors import UserError

__all__ = ["read_json", "read_jsonl", "read_name_list", "image_folder", "wds_urls", "read_wds", "WdsSample",
           "ImageRefs", "BytesImages", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = ("webp", "png", "jpg", "jpeg")  # what CLIP_benchmark's exports hold
_FOLDER_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: malformed JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records


def read_name_list(path: Path) -> list[str]:
    """Names one per line (a .txt, as CLIP_benchmark's classnames.txt) or a JSON list of strings."""
    if path.suffix.lower() == ".json":
        names = read_json(path)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{path}: expected a JSON list of strings")
    else:
        try:
            names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except FileNotFoundError:
            raise UserError(f"file not found: {path}") from None
        names = [n for n in names if n]
    if not names:
        raise UserError(f"{path}: empty list")
    return names


def image_folder(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """(class folder names sorted, image paths, labels) of an ImageFolder-style directory (as torchvision)."""
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise UserError(f"{root}: no class subfolders (expected DIR/CLASS/IMAGE)")
    paths, labels = [], []
    for label, name in enumerate(folders):
        for file in sorted((root / name).iterdir()):
            if file.suffix.lower() in _FOLDER_SUFFIXES:
                paths.append(file)
                labels.append(label)
    if not paths:
        raise UserError(f"{root}: no images in its class subfolders")
    return folders, paths, labels


# ------------------------------------------------------------------------------------------ webdataset
def wds_urls(root: Path, split: str) -> list[str]:
    """The shards of a CLIP_benchmark webdataset split: ``nshards.txt`` says how many, named ``0.tar``..."""
    count_file = root / split / "nshards.txt"
    if not count_file.is_file():
        raise UserError(f"{count_file}: not found (a CLIP_benchmark webdataset split has SPLIT/nshards.txt)")
    text = count_file.read_text().strip()
    if not text.isdigit() or int(text) == 0:
        raise UserError(f"{count_file}: expected a positive shard count, got '{text}'")
    urls = [root / split / f"{i}.tar" for i in range(int(text))]
    missing = [u for u in urls if not u.is_file()]
    if missing:
        raise UserError(f"{missing[0]}: shard not found ({len(missing)} of {len(urls)} missing)")
    return [str(u) for u in urls]


@dataclass
class WdsSample:
    key: str
    url: str
    image: bytes | None  # None when the reader was told not to keep it
    fields: dict[str, bytes]


def _wds_error(exc: Exception) -> bool:
    raise UserError(f"unreadable webdataset shard: {type(exc).__name__}: {exc}") from None


def read_wds(urls: Sequence[str], wanted: Sequence[str], keep_image: Callable[[int], bool] = lambda i: True
             ) -> Iterator[WdsSample]:
    """Every sample of the shards in order, with its image bytes (when ``keep_image(index)``) and the
    ``wanted`` fields (e.g. ``cls`` or ``txt``); a sample missing either, or a key seen twice, is an error."""
    import webdataset as wds

    pipeline = wds.WebDataset(list(urls), shardshuffle=False, nodesplitter=None, workersplitter=None,
                              empty_check=False, handler=_wds_error)
    seen: set[str] = set()
    for index, raw in enumerate(pipeline):
        key, url = str(raw["__key__"]), str(raw.get("__url__", ""))
        if key in seen:
            raise UserError(f"{url}: sample key '{key}' appears twice")
        seen.add(key)
        image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
        if image is None:
            raise UserError(f"{url}: sample '{key}' has no image ({'/'.join(IMAGE_EXTENSIONS)})")
        missing = [name for name in wanted if name not in raw]
        if missing:
            raise UserError(f"{url}: sample '{key}' has no '{missing[0]}' entry")
        yield WdsSample(key, url, image if keep_image(index) else None, {name: raw[name] for name in wanted})


# ------------------------------------------------------------------------------------------ image datasets
class ImageRefs(Dataset[Any]):
    """``transform(image)`` of ``paths[i]``, cropped to ``boxes[i]`` (x0, y0, x1, y1) when given."""

    def __init__(self, paths: Sequence[Path], transform: Any,
                 boxes: Sequence[tuple[float, float, float, float] | None] | None = None) -> None:
        self.paths, self.transform = list(paths), transform
        self.boxes = list(boxes) if boxes is not None else [None] * len(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        image = load_image_file(self.paths[index])
        box = self.boxes[index]
        return image if box is None else image.crop(box)

    def __getitem__(self, index: int) -> Any:
        return self.transform(self.load(index))


class BytesImages(Dataset[Any]):
    """``transform(image)`` of encoded image bytes held in memory (webdataset samples)."""

    def __init__(self, images: Sequence[bytes | None], names: Sequence[str], transform: Any) -> None:
        self.images, self.names, self.transform = images, names, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Any:
        data = self.images[index]
        if data is None:
            raise IndexError(f"image {index} was not kept by this process")
        try:
            image = open_image(data)
        except Exception as err:  # Pillow raises many types on corrupt data
            raise UserError(f"unreadable image in sample '{self.names[index]}': {type(err).__name__}: {err}") from None
        return self.transform(image)
