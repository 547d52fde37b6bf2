"""Atomic checkpoints, pruning, trainer state with weights_only loading, RNG round trips, safetensors ties."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vlp.config.schema import OptimConfig, ScheduleConfig
from vlp.errors import UserError
from vlp.train.checkpoint import (
    COMPLETE_MARKER,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    load_tensors,
    load_trainer_state,
    prune_checkpoints,
    save_checkpoint,
    save_tensors,
    save_trainer_state,
    write_atomic,
)
from vlp.train.optim import build_optimizer
from vlp.train.schedule import build_scheduler
from vlp.train.seeding import rng_state, seed_everything, set_rng_state


def _writer(text: str) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        (directory / "weights.txt").write_text(text)
        (directory / "sub").mkdir()
        (directory / "sub" / "more.txt").write_text(text * 2)

    return write


def _draws() -> tuple[list[float], list[float], list[float], torch.Tensor]:
    return ([random.random() for _ in range(3)] + [random.gauss(0, 1)], list(np.random.rand(3)),
            list(np.random.randn(3)), torch.randn(4))


def test_write_atomic_creates_complete_directory(tmp_path: Path) -> None:
    target = write_atomic(tmp_path / "ckpt" / "step_1", _writer("one"))
    assert target == tmp_path / "ckpt" / "step_1"
    assert (target / "weights.txt").read_text() == "one"
    assert (target / "sub" / "more.txt").read_text() == "oneone"
    assert (target / COMPLETE_MARKER).is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["step_1"]


def test_crash_inside_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, _writer("first"))

    def crashing(directory: Path) -> None:
        (directory / "weights.txt").write_text("half of the new")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(root, 2, crashing)
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]  # no step_2, no temp dir
    assert latest_checkpoint(root) == root / "step_1"
    assert (root / "step_1" / "weights.txt").read_text() == "first"


def test_disk_full_is_one_line_naming_the_checkpoint_and_keeps_the_previous_one(tmp_path: Path) -> None:
    import errno

    from vlp.errors import UserError

    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, _writer("first"))

    def full_disk(directory: Path) -> None:
        (directory / "weights.txt").write_text("part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"step_2: not saved, no space left on the device") as info:
        save_checkpoint(root, 2, full_disk)
    assert "\n" not in str(info.value) and "intact" in str(info.value)
    assert sorted(p.name for p in root.iterdir()) == ["step_1"]
    assert (root / "step_1" / "weights.txt").read_text() == "first"
    def denied(directory: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    with pytest.raises(PermissionError):  # other OS errors keep their own type
        save_checkpoint(root, 3, denied)


def test_killed_save_leftovers_are_ignored_then_removed(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 1, _writer("first"))
    leftover = root / ".tmp-step_2-99999"  # what a SIGKILL mid-write leaves behind
    leftover.mkdir()
    (leftover / "weights.txt").write_text("partial")
    (root / "step_7").mkdir()  # a step directory without the COMPLETE marker is not a checkpoint
    assert latest_checkpoint(root) == root / "step_1"
    save_checkpoint(root, 3, _writer("third"))
    assert not leftover.exists()
    assert latest_checkpoint(root) == root / "step_3"
    assert [step for step, _ in list_checkpoints(root)] == [1, 3]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 5, _writer("old"))
    save_checkpoint(root, 5, _writer("new"))
    assert (root / "step_5" / "weights.txt").read_text() == "new"
    assert sorted(p.name for p in root.iterdir()) == ["step_5"]


def test_latest_and_prune_order_steps_numerically(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None  # no root yet
    for step in (2, 9, 10, 100):
        save_checkpoint(root, step, _writer(str(step)))
    assert latest_checkpoint(root) == checkpoint_path(root, 100)
    deleted = prune_checkpoints(root, keep_last=2)
    assert deleted == [root / "step_2", root / "step_9"]
    assert [step for step, _ in list_checkpoints(root)] == [10, 100]
    save_checkpoint(root, 150, _writer("150"), keep_last=2)
    assert [step for step, _ in list_checkpoints(root)] == [100, 150]


def test_rng_round_trip_repeats_every_generator(tmp_path: Path) -> None:
    seed_everything(123)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)  # and in python's
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    first = _draws()
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    second = _draws()
    assert first[:3] == second[:3]
    assert torch.equal(first[3], second[3])
    seed_everything(123)
    reseeded = _draws()
    seed_everything(123)
    assert reseeded[0] == _draws()[0]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
           seeds: range) -> None:
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        inputs = torch.randn(4, 6, generator=generator)
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()
        scheduler.step()


def test_trainer_state_resumes_optimizer_and_schedule_identically(tmp_path: Path) -> None:
    cfg, schedule = OptimConfig(weight_decay=0.1), ScheduleConfig(warmup_steps=2, min_lr_ratio=0.1)
    model = _model()
    optimizer = build_optimizer(model, cfg, lr=1e-2, device_type="cpu")
    scheduler = build_scheduler(optimizer, schedule, max_steps=10)
    _train(model, optimizer, scheduler, range(3))
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": 3,
             "data": {"epoch": 0, "batches_in_epoch": 3}, "rng": rng_state(), "nonfinite_total": 0}
    save_trainer_state(tmp_path / "trainer_state.pt", state)
    torch.save(model.state_dict(), tmp_path / "model.pt")

    resumed = _model()
    resumed.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    resumed_opt = build_optimizer(resumed, cfg, lr=1e-2, device_type="cpu")
    resumed_sched = build_scheduler(resumed_opt, schedule, max_steps=10)
    loaded = load_trainer_state(tmp_path / "trainer_state.pt")
    resumed_opt.load_state_dict(loaded["optimizer"])
    resumed_sched.load_state_dict(loaded["scheduler"])
    assert loaded["step"] == 3 and loaded["data"] == {"epoch": 0, "batches_in_epoch": 3}
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])

    _train(model, optimizer, scheduler, range(3, 7))
    _train(resumed, resumed_opt, resumed_sched, range(3, 7))
    for original, restored in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(original, restored)
    assert resumed_sched.get_last_lr() == scheduler.get_last_lr()


def test_load_trainer_state_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_trainer_state(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="garbage.pt: not a loadable trainer state"):
        load_trainer_state(tmp_path / "garbage.pt")
    # An arbitrary pickled object is refused by weights_only loading.
    torch.save({"path": Path("x")}, tmp_path / "object.pt")
    with pytest.raises(UserError, match="object.pt"):
        load_trainer_state(tmp_path / "object.pt")


def test_save_tensors_handles_tied_and_overlapping_tensors(tmp_path: Path) -> None:
    table = torch.randn(10, 4)
    buffer = torch.arange(12.0)
    tensors = {"embed.weight": table, "decoder.weight": table, "buffer": buffer, "buffer_head": buffer[:4],
               "transposed": torch.randn(3, 5).t(), "empty": torch.zeros(0)}
    with pytest.raises(RuntimeError):  # plain safetensors refuses shared memory
        save_file(tensors, str(tmp_path / "plain.safetensors"))
    save_tensors(tmp_path / "tied.safetensors", tensors, metadata={"format": "pt"})
    loaded = load_tensors(tmp_path / "tied.safetensors")
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor), name
    assert loaded["decoder.weight"] is loaded["embed.weight"]  # the tie survives the round trip
    assert loaded["buffer_head"].data_ptr() != loaded["buffer"].data_ptr()  # overlapping slice: a copy

    def tied_model() -> tuple[nn.Module, nn.Embedding]:
        embedding, decoder = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        decoder.weight = embedding.weight
        return nn.Sequential(embedding, decoder), embedding

    model, embedding = tied_model()
    save_tensors(tmp_path / "model.safetensors", model.state_dict())
    fresh, fresh_embedding = tied_model()
    fresh.load_state_dict(load_tensors(tmp_path / "model.safetensors"))
    assert torch.equal(fresh_embedding.weight, embedding.weight)


def test_load_tensors_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        load_tensors(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(UserError, match="bad.safetensors: not a readable safetensors file"):
        load_tensors(tmp_path / "bad.safetensors")
