"""Image-text pair datasets: embedded synthetic, JSON/JSONL, Hugging Face datasets, webdataset shards.

Each yields ``{"image": Tensor [3,H,W], "caption": str, "image_id": int}``, or None for a sample that
cannot be used (missing, truncated or non-image file, empty caption): the path is logged once and the
``Collator`` drops and counts it, so the count reaches the main process even from DataLoader workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlp.config.schema import DataConfig
from vlp.data.csv_records import CsvFormat, is_table_file, read_csv_records
from vlp.data.synthetic import SyntheticScenes
from vlp.data.transforms import ImageTransform, open_image
from vlp.errors import ConfigError, UserError
from vlp.registry import datasets as dataset_registry

__all__ = [
    "SyntheticPairs",
    "JsonPairs",
    "HFPairs",
    "WebDatasetPairs",
    "needs_train",
    "build_pretrain_dataset",
    "read_json_records",
    "read_pair_records",
    "csv_format_from",
]

logger = logging.getLogger(__name__)

Sample = dict[str, Any]
_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm")
_IMAGE_COLUMNS = ("image", "img", "jpg", "png", "image_path", "file_name")
_CAPTION_COLUMNS = ("caption", "captions", "text", "txt", "sentences", "sentence")


def _parse_json(text: str, path: Path, line: int | None = None) -> Any:
    """``json.loads``; malformed JSON is one UserError naming the file and line (``line``: the JSONL line that
    ``text`` is, else the line of the error inside ``text``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        where, what = (line, "JSON line") if line is not None else (err.lineno, "JSON")
        raise UserError(f"{path}:{where}: malformed {what} ({err.msg})") from None


def read_json_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """A JSON list of objects or a JSONL file -> [(location, record)], location = "line N" or "entry N".

    Non-UTF-8 bytes are replaced rather than fatal; a missing file or malformed JSON raises UserError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    text = path.read_bytes().decode("utf-8", errors="replace")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            record = _parse_json(line, path, number)
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append((f"line {number}", record))
        return records
    entries = _parse_json(text, path)
    if not isinstance(entries, list):
        raise UserError(f"{path}: expected a JSON list of objects")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(f"{path}: entry {index} is not a JSON object")
    return [(f"entry {index}", entry) for index, entry in enumerate(entries)]


def read_pair_records(path: str | Path, csv_format: CsvFormat | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Image-text records of a JSON/JSONL file, or of a CSV/TSV table (a name ending in .csv/.tsv) read with
    ``csv_format``; table rows come back as ``{"image", "caption"}`` records."""
    if is_table_file(path):
        return read_csv_records(path, csv_format)
    return read_json_records(path)


def csv_format_from(cfg: DataConfig) -> CsvFormat:
    return CsvFormat(cfg.csv_separator, cfg.csv_image_key, cfg.csv_caption_key)


def captions_of_record(record: dict[str, Any], path: Path, location: str) -> list[str]:
    """The record's ``caption`` (or ``text``, as the Hugging Face and webdataset readers accept): a string or
    a list of strings."""
    key = "caption" if "caption" in record or "text" not in record else "text"
    if key not in record:
        raise UserError(f"{path}: {location}: missing key 'caption' (or 'text')")
    caption = record[key]
    captions = caption if isinstance(caption, list) else [caption]
    if not all(isinstance(c, str) or c is None for c in captions):
        raise UserError(f"{path}: {location}: '{key}' must be a string or a list of strings")
    return [c or "" for c in captions]


def _clean_caption(caption: Any) -> str:
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="replace")
    return "" if caption is None else " ".join(str(caption).split())


_MAX_PENDING_BAD = 256  # bad-sample reports held for the collator; beyond this they are only counted


class _PairReader:
    """Decoding, counters and warn-once bookkeeping shared by the pair datasets (per worker process).

    Every bad sample is also queued as (path, reason) for ``take_bad``: the ``Collator`` of the same worker
    drains it into the batch, so the training loop in the main process can log each path once across all
    workers and epochs and name examples when it stops; it then sets ``log_bad = False``.
    """

    def __init__(self, transform: ImageTransform) -> None:
        self.transform = transform
        self.samples_read = 0
        self.bad_samples = 0
        self.log_bad = True
        self._warned: set[str] = set()
        self._pending: list[tuple[str, str]] = []
        self._unyielded = 0

    def _bad(self, name: str, reason: str) -> None:
        self.bad_samples += 1
        if len(self._pending) < _MAX_PENDING_BAD:
            self._pending.append((name, reason))
        if self.log_bad and name not in self._warned:
            self._warned.add(name)
            logger.warning("skipping sample %s: %s", name, reason)

    def take_bad(self) -> tuple[list[tuple[str, str]], int]:
        """The (path, reason) of the bad samples since the last call, and how many of them produced no
        ``None`` sample (unreadable shard data) and so are not visible to the collator otherwise."""
        pending, unyielded = self._pending, self._unyielded
        self._pending, self._unyielded = [], 0
        return pending, unyielded

    def _make(self, source: str | Path | bytes | None, caption: Any, image_id: int,
              name: str) -> Sample | None:
        self.samples_read += 1
        text = _clean_caption(caption)
        if not text:
            self._bad(name, "no caption" if caption is None else "empty caption")
            return None
        if source is None:
            self._bad(name, "no image")
            return None
        try:
            image = open_image(source)
        except Exception as err:  # Pillow plugins raise many exception types on corrupt files
            self._bad(name, f"unreadable image ({type(err).__name__}: {err})")
            return None
        return {"image": self.transform(image), "caption": text, "image_id": image_id}


class SyntheticPairs(_PairReader, Dataset[Sample]):
    """The in-memory synthetic scenes; each index gets a fresh paraphrase per epoch (``set_epoch``)."""

    def __init__(self, scenes: SyntheticScenes, transform: ImageTransform) -> None:
        super().__init__(transform)
        self.scenes = scenes
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> Sample:
        self.samples_read += 1
        return {"image": self.transform(self.scenes.render(index)),
                "caption": self.scenes.caption(index, self.epoch), "image_id": index}


class JsonPairs(_PairReader, Dataset[Sample | None]):
    """JSON list or JSONL of ``{"image", "caption"}`` (or a CSV/TSV table, read with ``csv_format``); a
    caption list gives one sample per caption.

    ``image_id`` is the record's integer ``image_id`` when given, else the index of the image (records
    naming the same image, or the same non-integer image_id, share one id).
    """

    def __init__(self, path: str | Path, image_root: str | Path, transform: ImageTransform,
                 csv_format: CsvFormat | None = None) -> None:
        super().__init__(transform)
        path = Path(path)
        self.image_root = Path(image_root)
        if not self.image_root.is_dir():  # otherwise every sample would be skipped as missing
            raise UserError(f"image root directory not found: {image_root}")
        ids: dict[str, int] = {}
        self.samples: list[tuple[str, str, int]] = []
        for location, record in read_pair_records(path, csv_format):
            image = record.get("image")
            if not isinstance(image, str) or not image:
                raise UserError(f"{path}: {location}: 'image' must be a non-empty string (a path)")
            given = record.get("image_id")
            if isinstance(given, int) and not isinstance(given, bool):
                image_id = given
            else:
                image_id = ids.setdefault(image if given is None else f"id:{given}", len(ids))
            captions = captions_of_record(record, path, location)
            self.samples += [(image, caption, image_id) for caption in captions]
        if not self.samples:
            raise UserError(f"{path}: no samples")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample | None:
        image, caption, image_id = self.samples[index]
        file = self.image_root / image
        return self._make(file, caption, image_id, str(file))


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
                 path: Path) -> str:
    options = candidates if wanted is None else (wanted,)
    found = next((c for c in options if c in columns), None)
    if found is None:
        raise UserError(f"{path}: no {what} column ({' / '.join(options)}); columns: {columns}")
    return found


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or info lines from ``datasets`` while it indexes a local folder."""
    from datasets.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


class HFPairs(_PairReader, Dataset[Sample | None]):
    """A Hugging Face ``datasets`` directory: ``save_to_disk`` output, or an imagefolder (``metadata.jsonl``
    linking images by ``file_name``). Images are decoded here (not by ``datasets``) so a bad file is skipped;
    a caption column of lists gives one sample per caption; ``image_id`` is the row index.
    """

    def __init__(self, path: str | Path, transform: ImageTransform, split: str = "train",
                 image_column: str | None = None, caption_column: str | None = None,
                 cache_dir: str | Path | None = None) -> None:
        super().__init__(transform)
        import datasets as hf_datasets

        self.path = path = Path(path)
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            loaded = hf_datasets.load_from_disk(str(path))
        elif any((path / name).is_file() for name in ("metadata.jsonl", "metadata.csv")):
            with _quiet_datasets():  # its "Downloading data" bars would suggest a download of a local folder
                loaded = hf_datasets.load_dataset("imagefolder", data_dir=str(path),
                                                  cache_dir=None if cache_dir is None else str(cache_dir))
        else:
            raise UserError(f"{path}: not a Hugging Face datasets directory (save_to_disk output or an "
                            "imagefolder with metadata.jsonl)")
        if isinstance(loaded, hf_datasets.DatasetDict):
            if split not in loaded:
                raise UserError(f"{path}: no split '{split}'; splits: {sorted(loaded)}")
            loaded = loaded[split]
        columns = list(loaded.column_names)
        self.image_column = _pick_column(columns, image_column, _IMAGE_COLUMNS, "image", path)
        self.caption_column = _pick_column(columns, caption_column, _CAPTION_COLUMNS, "caption", path)
        if isinstance(loaded.features[self.image_column], hf_datasets.Image):
            loaded = loaded.cast_column(self.image_column, hf_datasets.Image(decode=False))
        self.data = loaded
        if hasattr(loaded.features[self.caption_column], "feature"):  # a list of captions per row
            self.index = [(row, k) for row, captions in enumerate(loaded[self.caption_column])
                          for k in range(len(captions or []))]
        else:
            self.index = [(row, -1) for row in range(len(loaded))]

    def __len__(self) -> int:
        return len(self.index)

    def _source(self, value: Any) -> str | Path | bytes | None:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, str):
            return self.path / value  # absolute paths stay absolute
        return value if isinstance(value, bytes) else None

    def __getitem__(self, index: int) -> Sample | None:
        row, k = self.index[index]
        record = self.data[row]
        caption = record[self.caption_column] if k < 0 else record[self.caption_column][k]
        return self._make(self._source(record[self.image_column]), caption, row, f"{self.path}[{row}]")


class WebDatasetPairs(_PairReader, IterableDataset[Sample | None]):
    """webdataset tar shards (brace patterns such as ``shard-{000..009}.tar``); image key jpg/png/...,
    caption from ``txt`` or a ``json`` with ``caption``/``text``. Shards are split over ranks and workers;
    ``shuffle_buffer`` > 0 shuffles shards and samples, seeded from (seed, epoch, worker).
    """

    def __init__(self, pattern: str, transform: ImageTransform, shuffle_buffer: int = 0,
                 seed: int = 0) -> None:
        super().__init__(transform)
        import webdataset as wds

        self.urls: list[str] = list(wds.SimpleShardList(pattern).urls)
        local = [u for u in self.urls if "://" not in u and not u.startswith("pipe:")]
        missing = [u for u in local if not Path(u).is_file()]
        if missing:
            raise UserError(f"shard not found: {missing[0]} ({len(missing)} of {len(self.urls)} missing)")
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _tar_error(self, err: Exception) -> bool:
        self._bad(str(getattr(err, "args", [""])[-1]), f"unreadable shard data ({type(err).__name__})")
        self._unyielded += 1  # no None reaches the collator for this one
        return True  # keep going with the next sample / shard

    def _decode(self, sample: dict[str, Any]) -> Sample | None:
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        image = next((sample[k] for k in _IMAGE_KEYS if k in sample), None)
        meta: Any = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                meta = {}
        meta = meta if isinstance(meta, dict) else {}
        caption = sample.get("txt", sample.get("caption", meta.get("caption", meta.get("text"))))
        given = meta.get("image_id")
        key_hash = zlib.crc32(str(sample.get("__key__")).encode()) & 0x7FFFFFFF
        image_id = given if isinstance(given, int) else key_hash
        return self._make(image, caption, image_id, name)

    def __iter__(self) -> Iterator[Sample | None]:
        for sample in self.raw_samples(self.epoch):
            yield self._decode(sample)

    def raw_samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This rank's and worker's shards as undecoded tar samples, in the order of (seed, ``epoch``)."""
        import webdataset as wds

        urls = list(self.urls)
        stages: list[Any] = []
        if self.shuffle_buffer > 0:
            random.Random(self.seed + epoch).shuffle(urls)  # same order on every rank and worker
            worker = get_worker_info()
            rng = random.Random(f"{self.seed}:{epoch}:{0 if worker is None else worker.id}")
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng))
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                                    wds.tarfile_to_samples(handler=self._tar_error), *stages)
        yield from pipeline


def needs_train(cfg: DataConfig) -> str:
    """``data.train``, or an error naming the source that needs it."""
    if not cfg.train:
        raise ConfigError(f"data.train is empty; data.source '{cfg.source}' needs a training data path")
    return cfg.train


@dataset_registry.register("synthetic")
def build_synthetic_pairs(cfg: DataConfig, transform: ImageTransform, image_size: int) -> SyntheticPairs:
    scenes = SyntheticScenes(cfg.synthetic_train_size, cfg.synthetic_seed, "train", image_size,
                             cfg.synthetic_repeated_captions)
    return SyntheticPairs(scenes, transform)


@dataset_registry.register("json")
@dataset_registry.register("csv")
def build_json_pairs(cfg: DataConfig, transform: ImageTransform, image_size: int) -> JsonPairs:
    """``json`` and ``csv`` read the same files: JSON/JSONL, or a CSV/TSV table (by its .csv/.tsv suffix)."""
    if not Path(needs_train(cfg)).is_file():
        raise UserError(f"data.train: file not found: {cfg.train}")
    if not Path(cfg.image_root).is_dir():
        raise UserError(f"data.image_root: directory not found: {cfg.image_root}")
    return JsonPairs(cfg.train, cfg.image_root, transform, csv_format_from(cfg))


@dataset_registry.register("hf")
def build_hf_pairs(cfg: DataConfig, transform: ImageTransform, image_size: int) -> HFPairs:
    if not Path(needs_train(cfg)).is_dir():
        raise UserError(f"data.train: directory not found: {cfg.train}")
    return HFPairs(cfg.train, transform)


def build_pretrain_dataset(data_cfg: DataConfig, transform: ImageTransform,
                           image_size: int) -> Dataset[Any] | IterableDataset[Any]:
    """The training pairs named by ``data.source`` (a ``datasets`` registry name; the streaming sources are
    registered by vlp/data/streaming.py, which the ``vlp.data`` package imports)."""
    try:
        builder = dataset_registry.get(data_cfg.source)
    except KeyError as err:
        raise ConfigError(f"data.source: {err.args[0]}") from None
    dataset: Dataset[Any] | IterableDataset[Any] = builder(data_cfg, transform, image_size)
    return dataset
