"""Streaming training data (webdataset shards, Hugging Face iterable datasets) with equal epochs per rank.

Shards are split over ranks and then over DataLoader workers (webdataset: ``split_by_node``,
``split_by_worker``; Hugging Face: ``split_dataset_by_node``, then ``datasets``' own split over workers).
Shards rarely hold equal sample counts, and a rank that runs out first would leave the others waiting in
their next collective: DDP hangs. So an epoch here is a fixed number of batches on every rank::

    batches per rank = samples_per_epoch // (batch_size x world_size)

``samples_per_epoch`` is ``data.samples_per_epoch``, or counted when that is 0 (the tar headers of local
shards; the rows x captions of a ``datasets`` directory). A rank's batches are dealt to its W workers in
turn, as the DataLoader consumes them: worker w makes n // W of them, plus one when w < n % W. A worker
whose shards run dry starts another pass over them (reshuffled); one with samples to spare stops early.
With equal shards and counts that divide evenly, every sample is seen exactly once per epoch; otherwise an
epoch repeats or leaves out a few samples (as webdataset's ``with_epoch`` does).

Resume: a worker's stream is a function of (seed, epoch, rank, worker), so after k batches of an epoch
worker w has made k // W of them (+1 when w < k % W). ``skip_batches(k, W)`` makes each worker pass over
its k // W whole rounds without decoding them; the last k % W batches are read and dropped by the caller
(a new DataLoader starts its round at worker 0). The run then continues with the batches an uninterrupted
run would have seen, as long as the data, world size, batch size and ``num_workers`` are unchanged (else the
position is approximate). ``datasets``' own ``IterableDataset.state_dict()`` is not used: with workers it lives in the
worker processes, out of reach of a plain DataLoader (it needs torchdata's StatefulDataLoader).
"""

from __future__ import annotations

import random
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlp.collectives import rank_and_world
from vlp.config.schema import DataConfig
from vlp.data.datasets import HFPairs, Sample, WebDatasetPairs, needs_train
from vlp.data.transforms import ImageTransform
from vlp.errors import ConfigError, UserError
from vlp.registry import datasets as dataset_registry

__all__ = ["EpochStream", "WebDatasetStream", "HFStreamPairs", "count_tar_samples", "worker_share",
           "build_webdataset_stream", "build_hf_stream"]

_PASS_STRIDE = 1_000_003  # pass p of epoch e reshuffles as "epoch" e + p * stride: distinct from other epochs


def worker_share(batches: int, worker: int, workers: int) -> int:
    """How many of a rank's first ``batches`` batches worker ``worker`` of ``workers`` makes (the DataLoader
    takes one batch from each worker in turn)."""
    return batches // workers + int(worker < batches % workers)


def count_tar_samples(urls: list[str]) -> int:
    """Samples in local tar shards: distinct keys (webdataset's: the member path up to the first dot of its
    file name), read from the tar headers only."""
    total = 0
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            raise ConfigError(f"data.samples_per_epoch: shard {url} is not a local file, so its samples cannot "
                              "be counted; set data.samples_per_epoch")
        keys = set()
        try:
            with tarfile.open(url, "r:*") as tar:
                for member in tar:
                    if member.isfile():
                        path = Path(member.name)
                        keys.add(str(path.parent / path.name.split(".", 1)[0]))
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"{url}: cannot read the tar shard ({err})") from None
        total += len(keys)
    return total


class EpochStream(IterableDataset[Sample | None]):
    """An iterable dataset that yields exactly its share of ``batches_per_rank`` batches per epoch per worker
    (see the module docstring). Subclasses give ``raw_pass(index)`` (this rank's and worker's samples,
    undecoded, pass ``index`` of the current epoch) and ``decode(raw)``."""

    def _init_stream(self, samples_per_epoch: int, batch_size: int, seed: int) -> None:
        rank, world = rank_and_world()
        self.samples_per_epoch, self.batch_size, self.world_size = samples_per_epoch, batch_size, world
        self.stream_seed, self.rank = seed, rank
        self.epoch, self.skip = 0, 0
        if self.batches_per_rank() == 0:
            raise UserError(f"{samples_per_epoch} samples per epoch make no batch of {batch_size} on each of "
                            f"{world} process(es)")

    def batches_per_rank(self) -> int:
        return self.samples_per_epoch // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.skip = epoch, 0

    def skip_batches(self, count: int, workers: int = 1) -> int:
        """Start the epoch (set by ``set_epoch`` before) after this rank's first ``count`` batches, for a
        DataLoader with ``workers`` workers. The workers skip whole rounds (one batch each) without decoding;
        the last ``count % workers`` batches are returned for the caller to read and drop, because a new
        DataLoader takes its first batch from worker 0, not from the worker whose turn it was."""
        self.skip = count - count % workers
        return count % workers

    def __len__(self) -> int:
        return self.batches_per_rank() * self.batch_size

    def _seeded_decode(self, raw: Any, worker: int, position: int) -> Sample | None:
        """Decode with the RNGs seeded from the sample's place in the stream, so augmentations do not depend
        on how many samples were decoded before it (a resumed run skips them undecoded)."""
        key = f"{self.stream_seed}:{self.epoch}:{self.rank}:{worker}:{position}"
        sample_seed = zlib.crc32(key.encode()) * 2_654_435_761 % 2**63
        state = random.getstate()
        with torch.random.fork_rng(devices=[]):  # leave the worker's own streams untouched
            # the CPU generator alone: torch.manual_seed also queues a lazy seed per accelerator backend, each
            # recording a formatted Python stack (about 1 ms a sample, half a demo batch's loading time)
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            try:
                return self.decode(raw)
            finally:
                random.setstate(state)

    def raw_pass(self, index: int) -> Iterator[Any]:
        raise TypeError(f"{type(self).__name__} must implement raw_pass")

    def decode(self, raw: Any) -> Sample | None:
        raise TypeError(f"{type(self).__name__} must implement decode")

    def __iter__(self) -> Iterator[Sample | None]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        quota = worker_share(self.batches_per_rank(), worker, workers) * self.batch_size
        skip = min(worker_share(self.skip, worker, workers) * self.batch_size, quota)
        produced, index = 0, 0
        while produced < quota:
            before = produced
            for raw in self.raw_pass(index):
                if produced >= skip:
                    yield self._seeded_decode(raw, worker, produced)
                produced += 1
                if produced == quota:
                    return
            if produced == before:
                rank, world = rank_and_world()
                raise UserError(f"data loader worker {worker} of rank {rank} got no samples: fewer shards than "
                                f"{world} process(es) x {workers} worker(s); add shards or lower data.num_workers")
            index += 1


class WebDatasetStream(EpochStream, WebDatasetPairs):
    """``WebDatasetPairs`` with equal epochs on every rank and resumable positions."""

    def __init__(self, pattern: str, transform: ImageTransform, batch_size: int, samples_per_epoch: int = 0,
                 shuffle_buffer: int = 1000, seed: int = 0) -> None:
        WebDatasetPairs.__init__(self, pattern, transform, shuffle_buffer=shuffle_buffer, seed=seed)
        self._init_stream(samples_per_epoch or count_tar_samples(self.urls), batch_size, seed)

    def raw_pass(self, index: int) -> Iterator[Any]:
        return self.raw_samples(self.epoch + index * _PASS_STRIDE)

    def decode(self, raw: Any) -> Sample | None:
        return self._decode(raw)


class HFStreamPairs(EpochStream, HFPairs):
    """A ``datasets`` directory read in iterable mode: ``to_iterable_dataset(num_shards)``, a seeded shuffle
    buffer, ``split_dataset_by_node``; ``datasets`` splits each rank's shards over the DataLoader workers.

    A caption column of lists gives one sample per caption. ``image_id`` is a hash of the image's path (or
    bytes), since rows carry no index in iterable mode.
    """

    def __init__(self, path: str | Path, transform: ImageTransform, batch_size: int, num_workers: int,
                 samples_per_epoch: int = 0, shuffle_buffer: int = 1000, seed: int = 0) -> None:
        from datasets.distributed import split_dataset_by_node

        HFPairs.__init__(self, path, transform)
        rank, world = rank_and_world()
        # whole shards per rank and per worker: datasets then splits by shard instead of by example
        per_worker = max(1, min(8, len(self.data) // (world * max(1, num_workers))))
        stream = self.data.to_iterable_dataset(num_shards=min(len(self.data), world * max(1, num_workers) * per_worker))
        if shuffle_buffer > 0:
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world)
        self._init_stream(samples_per_epoch or len(self.index), batch_size, seed)

    def raw_pass(self, index: int) -> Iterator[Any]:
        self.stream.set_epoch(self.epoch + index * _PASS_STRIDE)
        for record in self.stream:
            captions = record[self.caption_column]
            if isinstance(captions, list):
                yield from ((record, k) for k in range(len(captions)))
            else:
                yield record, -1

    def decode(self, raw: Any) -> Sample | None:
        record, k = raw
        caption = record[self.caption_column] if k < 0 else record[self.caption_column][k]
        value = record[self.image_column]
        key = (value.get("path") or value.get("bytes")) if isinstance(value, dict) else value
        key = key if isinstance(key, bytes) else str(key).encode()
        image_id = zlib.crc32(key) & 0x7FFFFFFF
        return self._make(self._source(value), caption, image_id, f"{self.path}[image {image_id}]")


def _checked_count(cfg: DataConfig) -> int:
    if cfg.samples_per_epoch < 0:
        raise ConfigError(f"data.samples_per_epoch must be >= 0; got {cfg.samples_per_epoch}")
    return cfg.samples_per_epoch


@dataset_registry.register("webdataset")
def build_webdataset_stream(cfg: DataConfig, transform: ImageTransform, image_size: int) -> WebDatasetStream:
    needs_train(cfg)
    return WebDatasetStream(cfg.train, transform, cfg.batch_size, _checked_count(cfg))


@dataset_registry.register("hf_stream")
def build_hf_stream(cfg: DataConfig, transform: ImageTransform, image_size: int) -> HFStreamPairs:
    if not Path(needs_train(cfg)).is_dir():
        raise UserError(f"data.train: directory not found: {cfg.train}")
    return HFStreamPairs(cfg.train, transform, cfg.batch_size, cfg.num_workers, _checked_count(cfg))
