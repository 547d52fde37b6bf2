"""SeededDataset: each sample's augmentation comes from its own seed, cheaply."""

from __future__ import annotations

import random
import traceback

import pytest
import torch

from vlp.train.sampler import SeededDataset


class _Draws:
    """A dataset whose samples are draws of the torch and python RNGs (what a random augmentation uses)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:
        return torch.rand(3), random.random()


def test_seeded_sample_matches_torch_manual_seed_and_leaves_caller_streams() -> None:
    data = SeededDataset(_Draws(), seed=3)
    data.set_epoch(2)
    torch.manual_seed(11)
    random.seed(11)
    caller_torch, caller_py = torch.rand(1), random.random()
    torch.manual_seed(11)
    random.seed(11)
    first = data[5]
    assert torch.equal(torch.rand(1), caller_torch) and random.random() == caller_py  # streams untouched
    assert torch.equal(data[5][0], first[0]) and data[5][1] == first[1]
    seed = (3 * 1_000_003 + 2 * 7_919 + 5 * 104_729) % (2**63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the documented seeding: the CPU stream torch.manual_seed sets
        expected = torch.rand(3)
    random.seed(seed)
    assert torch.equal(first[0], expected) and first[1] == random.random()
    assert not torch.equal(data[4][0], first[0])


def test_seeded_sample_formats_no_python_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.manual_seed queues a lazy seed per accelerator backend, each formatting the Python stack; per
    sample that was half the demo's loading time. Seeding must not go through it."""
    calls = []
    real = traceback.format_stack
    monkeypatch.setattr(traceback, "format_stack", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = SeededDataset(_Draws(), seed=0)
    for index in range(len(data)):
        data[index]
    assert not calls
