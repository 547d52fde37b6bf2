"""Faults during training: broken data, crashes and signals around checkpoints, non-finite steps, dead workers.

The subprocess tests run the real ``vlp`` CLI, kill it and resume in-process; CPU results are compared
bit for bit with an uninterrupted run (all with one intra-op thread, so the float reductions agree).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vlp.train.loop as loop
from vlp.cli.main import main
from vlp.config import load_config
from vlp.data.synthetic import COLORS, SHAPES
from vlp.errors import UserError
from vlp.objectives import PretrainObjective
from vlp.train import checkpoint as ckpt
from vlp.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/pretrain/demo_tiny.yaml"
ALBEF = ROOT / "configs/pretrain/albef_4m_tiny.yaml"  # momentum distillation + feature queue + MLM + ITM
STEPS = 6
# 32 samples / batch 8 = 4 batches per epoch: a kill after step 2 is mid-epoch, the resume crosses an epoch
RESUMABLE = [f"train.max_steps={STEPS}", "train.checkpoint_every=2", "data.synthetic_train_size=32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread; on a busy machine its spin-waits cost 4-6x CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- data faults through `vlp pretrain`

WORDS = [*COLORS, *SHAPES]


def _png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _mixed_dataset(root: Path, total: int = 240, per_kind: int = 3, long: int = 10) -> Path:
    """JSONL of ``total`` records: 4 x ``per_kind`` bad ones (missing, truncated, non-image file, empty
    caption), ``long`` over-long captions, non-UTF-8 bytes, and good images in six Pillow modes."""
    images = root / "images"
    images.mkdir(parents=True)
    rgb = Image.new("RGB", (20, 24), (200, 30, 30))
    goods = {"rgb.png": _png_bytes(rgb), "gray.png": _png_bytes(rgb.convert("L")),
             "rgba.png": _png_bytes(rgb.convert("RGBA")), "cmyk.jpg": _png_bytes(rgb.convert("CMYK"), "JPEG"),
             "deep.png": _png_bytes(Image.fromarray(np.full((24, 20), 40_000, dtype=np.uint16))),
             "palette.png": _png_bytes(rgb.convert("P"))}
    for name, data in goods.items():
        (images / name).write_bytes(data)
    lines: list[bytes] = []
    bad = 4 * per_kind
    for k in range(per_kind):
        (images / f"truncated_{k}.png").write_bytes(goods["rgb.png"][:50])
        (images / f"text_{k}.png").write_bytes(b"not an image at all")
        lines += [json.dumps({"image": f"images/missing_{k}.png", "caption": "a red circle"}).encode(),
                  json.dumps({"image": f"images/truncated_{k}.png", "caption": "a red circle"}).encode(),
                  json.dumps({"image": f"images/text_{k}.png", "caption": "a red circle"}).encode(),
                  json.dumps({"image": "images/rgb.png", "caption": "   "}).encode()]
    names = sorted(goods)
    for i in range(total - bad):
        words = [WORDS[(i + j) % len(WORDS)] for j in range(80 if i < long else 4)]
        caption = " ".join(words).encode()
        if i % 7 == 3:  # invalid UTF-8 inside a caption: replaced, not fatal
            caption += b" \xff\xfe"
        lines.append(b'{"image": "images/' + names[i % len(names)].encode() + b'", "caption": "' + caption + b'"}')
    (root / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root / "train.jsonl"


def _json_args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = ["data.source=json", f"data.train={data}", f"data.image_root={data.parent}", "data.num_workers=2",
            "data.batch_size=40", "optim.base_batch_size=40", "train.max_steps=12", "train.checkpoint_every=0",
            "train.log_every=3", "model.text.tokenizer=clip", *extra]
    return ["pretrain", str(DEMO), "--output-dir", str(out)] + [a for s in sets for a in ("--set", s)]


def test_broken_files_counted_logged_once_and_threshold(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = _mixed_dataset(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="vlp"):
        code = main(_json_args(data, tmp_path / "ok", "data.max_bad_fraction=0.1", "train.max_steps=6"))
    assert code == 0, capsys.readouterr().err
    last = [r for r in _records(tmp_path / "ok") if "bad_samples" in r][-1]
    # 6 steps x 40 = one epoch of 240 records, 12 of them unusable, 10 captions over max_length
    assert last["step"] == 6
    assert (last["bad_samples"], last["bad_fraction"], last["truncated_captions"]) == (12, 0.05, 10)
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping sample")]
    assert len(messages) == 10  # 9 broken files + the image of the 3 empty captions, each path once
    assert sum("missing_0.png" in m for m in messages) == 1
    assert any("empty caption" in m for m in messages) and any("unreadable image" in m for m in messages)

    code = main(_json_args(data, tmp_path / "default"))  # data.max_bad_fraction = 0.01 by default
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("vlp: error: ")
    match = re.search(r"(\d+) of (\d+) samples \(.*\) were unreadable, above data.max_bad_fraction=0.01; e.g. (.*)",
                      err[-1])
    assert match, err[-1]
    bad, read = int(match.group(1)), int(match.group(2))
    assert read == 200 and bad > 0.01 * read  # the first check after 200 samples stops it
    examples = match.group(3).split(", ")
    assert examples and all(str(data.parent / "images") in example for example in examples)
    assert not (tmp_path / "default" / "final").exists()


def test_all_bad_data_stops_instead_of_looping(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(json.dumps([{"image": f"gone{k}.png", "caption": "x"} for k in range(16)]))
    config = load_config(DEMO, ["data.source=json", f"data.train={tmp_path / 't.json'}",
                                f"data.image_root={tmp_path}", "data.max_bad_fraction=1.0",
                                "model.text.tokenizer=clip"])
    with pytest.raises(UserError, match=r"no readable sample in a whole epoch.*gone"):
        pretrain(config, output_dir=tmp_path / "run")


# ---------------------------------------------------------------- numerical faults

class _NanGradient(torch.autograd.Function):
    """Adds 0 to the loss and NaN to every gradient: a finite loss whose backward overflows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


def _nan_at(calls: dict[int, str]) -> Callable[..., Any]:
    """A PretrainObjective.forward whose n-th call (1-based) returns a NaN loss with finite gradients
    ("loss") or a finite loss with NaN gradients ("grad"); "rest" makes that and every later call "grad"."""
    real = PretrainObjective.forward
    count = {"n": 0}

    def forward(self: PretrainObjective, batch: dict[str, torch.Tensor]) -> Any:
        out = real(self, batch)
        count["n"] += 1
        kind = calls.get(count["n"], "")
        if kind == "loss":
            out.total = out.total + torch.tensor(float("nan"))  # a constant: the gradient stays finite
        elif kind == "grad" or any(v == "rest" and count["n"] >= k for k, v in calls.items()):
            out.total = out.total + _NanGradient.apply(out.total)
        return out

    return forward


def test_nonfinite_steps_are_skipped_counted_then_stop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(PretrainObjective, "forward", _nan_at({2: "loss", 4: "grad"}))
    config = load_config(DEMO, ["train.max_steps=5", "train.checkpoint_every=0"])
    with caplog.at_level(logging.WARNING, logger="vlp"):
        run = pretrain(config, output_dir=tmp_path / "skip")
    records = [r for r in _records(run) if "nonfinite_steps" in r]
    assert [r["nonfinite_steps"] for r in records] == [0, 1, 1, 2, 2]
    assert np.isnan(records[1]["loss"]) and np.isfinite(records[3]["loss"])
    warnings = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert warnings == ["step 2: non-finite loss, step skipped (1 in a row)",
                        "step 4: non-finite gradient, step skipped (1 in a row)"]
    optimizer = ckpt.load_trainer_state(run / "checkpoints" / "step_5" / "trainer_state.pt")["optimizer"]
    assert {int(s["step"]) for s in optimizer["state"].values()} == {3}  # AdamW stepped 5 - 2 times
    assert all(torch.isfinite(t).all() for t in load_file(str(run / "final" / "model.safetensors")).values())

    monkeypatch.setattr(PretrainObjective, "forward", _nan_at({4: "rest"}))
    config = load_config(DEMO, ["train.max_steps=10", "train.checkpoint_every=2", "train.max_nonfinite_steps=3"])
    latest = tmp_path / "stop" / "checkpoints" / "step_4"  # step 4 was skipped: its weights are step 3's
    with pytest.raises(UserError, match=re.escape(f"3 non-finite steps in a row (loss or gradient) at step 6; "
                                                  f"the last good checkpoint is {latest}")):
        pretrain(config, output_dir=tmp_path / "stop")
    assert ckpt.latest_checkpoint(tmp_path / "stop" / "checkpoints") == latest
    assert [r["nonfinite_steps"] for r in _records(tmp_path / "stop") if "nonfinite_steps" in r] == [0, 0, 0, 1, 2]


# ---------------------------------------------------------------- checkpoints: crash, signals, workers

def test_crash_inside_checkpoint_write_keeps_the_previous_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ckpt.save_trainer_state

    def crash_at_step_4(path: Path, state: dict[str, Any]) -> None:
        if state["step"] == 4:  # model.safetensors is already in the temp directory: a half-written checkpoint
            assert (Path(path).parent / "model.safetensors").is_file()
            raise OSError("disk full")
        real(path, state)

    monkeypatch.setattr(ckpt, "save_trainer_state", crash_at_step_4)
    config = load_config(DEMO, ["train.max_steps=5", "train.checkpoint_every=2"])
    with pytest.raises(OSError, match="disk full"):
        pretrain(config, output_dir=tmp_path)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_2"]  # no step_4, no temp directory
    assert ckpt.load_trainer_state(root / "step_2" / "trainer_state.pt")["step"] == 2
    monkeypatch.setattr(ckpt, "save_trainer_state", real)
    pretrain(config, output_dir=tmp_path, resume=True)
    steps = [r["step"] for r in _records(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 3, 4, 5]  # the second run went on from step 2
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4, 5]  # keep_last = 2


def test_signal_saves_then_exits_128_plus_signal_and_second_one_interrupts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = loop._optimizer_step
    signals = {"signal": signal.SIGTERM, "count": 1}

    def signalling_step(config: Any, module: Any, optimizer: Any, state: Any) -> bool:
        if state.step == 2:  # during step 3
            for _ in range(signals["count"]):
                os.kill(os.getpid(), signals["signal"])  # delivered to the loop's handler, between bytecodes
        return real(config, module, optimizer, state)

    monkeypatch.setattr(loop, "_optimizer_step", signalling_step)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    args = ["pretrain", str(DEMO), "--output-dir", str(tmp_path / "a"), "--set", "train.max_steps=6",
            "--set", "train.checkpoint_every=0"]
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"vlp: stopped: stopped by SIGTERM at step 3; checkpoint saved at "
                   f"{tmp_path / 'a' / 'checkpoints' / 'step_3'} (continue with --resume)")
    assert ckpt.latest_checkpoint(tmp_path / "a" / "checkpoints") == tmp_path / "a" / "checkpoints" / "step_3"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored

    signals.update(signal=signal.SIGINT, count=2)  # impatient user: a second Ctrl-C stops at once
    args[3] = str(tmp_path / "b")
    assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "vlp: interrupted"
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_dead_worker_is_one_clear_error_not_a_hang(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from torch.utils.data import get_worker_info

    from vlp.data.datasets import SyntheticPairs

    real = SyntheticPairs.__getitem__

    def getitem(self: SyntheticPairs, index: int) -> Any:
        if get_worker_info() is not None and self.samples_read >= 12:  # only ever inside a worker process
            os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does
        return real(self, index)

    monkeypatch.setattr(SyntheticPairs, "__getitem__", getitem)
    start = time.monotonic()
    code = main(["pretrain", str(DEMO), "--output-dir", str(tmp_path), "--set", "data.num_workers=1",
                 "--set", "train.max_steps=6"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and time.monotonic() - start < 120
    assert re.fullmatch(r"vlp: stopped: a data loader worker died at step \d+ \(.*DataLoader worker.*\); .*--resume",
                        err), err


def test_hung_worker_stops_after_worker_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from torch.utils.data import get_worker_info

    from vlp.data.datasets import SyntheticPairs

    real = SyntheticPairs.__getitem__

    def getitem(self: SyntheticPairs, index: int) -> Any:
        if get_worker_info() is not None and self.samples_read >= 12:  # a worker stuck on a read
            time.sleep(60)
        return real(self, index)

    monkeypatch.setattr(SyntheticPairs, "__getitem__", getitem)
    start = time.monotonic()
    code = main(["pretrain", str(DEMO), "--output-dir", str(tmp_path), "--set", "data.num_workers=1",
                 "--set", "data.worker_timeout=2", "--set", "train.max_steps=6"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and time.monotonic() - start < 50
    assert re.fullmatch(r"vlp: stopped: no batch from the data loader workers at step \d+ within "
                        r"data.worker_timeout \(DataLoader timed out after 2(\.0)? seconds\); .*--resume", err), err


# ---------------------------------------------------------------- subprocess kills (real CLI)

HANG_IN_WRITE = """
import pathlib, sys, time
import vlp.train.checkpoint as checkpoint
real = checkpoint.save_trainer_state
def save_trainer_state(path, state):
    if state["step"] == 4:  # model weights already written to the temp directory
        pathlib.Path(sys.argv[1]).write_text("writing")
        time.sleep(600)
    real(path, state)
checkpoint.save_trainer_state = save_trainer_state
from vlp.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _spawn(run_dir: Path, log: Path, driver: str | None = None, marker: Path | None = None) -> subprocess.Popen[bytes]:
    args = ["pretrain", str(ALBEF), "--output-dir", str(run_dir)] + [a for s in RESUMABLE for a in ("--set", s)]
    command = [sys.executable, "-m", "vlp.cli.main"] if driver is None else [sys.executable, "-c", driver, str(marker)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.Popen(command + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def _wait_for(path: Path, process: subprocess.Popen[bytes], log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before {path} appeared: {log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run the interrupted ones must reproduce bit for bit."""
    return pretrain(load_config(ALBEF, RESUMABLE), output_dir=tmp_path_factory.mktemp("straight"))


def _resume_and_compare(run_dir: Path, straight: Path) -> None:
    pretrain(load_config(ALBEF, RESUMABLE), output_dir=run_dir, resume=True)
    for name in ("final/model.safetensors", f"checkpoints/step_{STEPS}/objective.safetensors"):
        expected, got = load_file(str(straight / name)), load_file(str(run_dir / name))
        assert expected.keys() == got.keys(), name
        different = [key for key in expected if not torch.equal(expected[key], got[key])]
        assert not different, (name, different[:5])
    objective = load_file(str(run_dir / f"checkpoints/step_{STEPS}/objective.safetensors"))
    assert any(k.startswith("momentum.") for k in objective) and any(k.startswith("queue.") for k in objective)


def test_sigkill_after_a_checkpoint_then_resume_is_bit_identical(tmp_path: Path, straight: Path) -> None:
    log = tmp_path / "stderr.txt"
    process = _spawn(tmp_path / "run", log)
    _wait_for(tmp_path / "run" / "checkpoints" / "step_2" / ckpt.COMPLETE_MARKER, process, log)
    process.send_signal(signal.SIGKILL)
    assert process.wait(60) == -signal.SIGKILL
    assert not (tmp_path / "run" / "final").exists()  # killed mid-run (normally during step 3), not after it
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest is not None and latest.name in ("step_2", "step_4")
    # the full training state, loadable with weights_only=True (tensors and plain values only)
    trainer = ckpt.load_trainer_state(latest / "trainer_state.pt")
    assert {"optimizer", "scheduler", "step", "epoch", "batches_in_epoch", "rng", "rng_ranks"} <= set(trainer)
    assert trainer["optimizer"]["state"] and set(trainer["rng"]) >= {"python", "numpy", "torch"}
    assert (trainer["epoch"], trainer["batches_in_epoch"]) == (0, trainer["step"])  # 2 of the epoch's 4 batches
    assert {k.split(".")[0] for k in load_file(str(latest / "objective.safetensors"))} == {"momentum", "queue"}
    _resume_and_compare(tmp_path / "run", straight)


def test_sigkill_during_checkpoint_write_resumes_from_previous(tmp_path: Path, straight: Path) -> None:
    log, marker, root = tmp_path / "stderr.txt", tmp_path / "writing", tmp_path / "run" / "checkpoints"
    process = _spawn(tmp_path / "run", log, HANG_IN_WRITE, marker)
    _wait_for(marker, process, log)
    process.send_signal(signal.SIGKILL)
    assert process.wait(60) == -signal.SIGKILL
    partial = [p for p in root.iterdir() if p.name.startswith(".tmp-step_4")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()  # a half-written checkpoint
    (root / "step_99").mkdir()  # a step directory without the COMPLETE marker is no checkpoint either
    assert ckpt.latest_checkpoint(root) == root / "step_2"
    _resume_and_compare(tmp_path / "run", straight)
    assert not partial[0].exists()  # the next save removed the leftover


@pytest.mark.slow  # the in-process signal test covers the same path; this one sends it from outside
def test_sigterm_saves_a_checkpoint_exits_143_and_resumes(tmp_path: Path, straight: Path) -> None:
    log = tmp_path / "stderr.txt"
    process = _spawn(tmp_path / "run", log)
    _wait_for(tmp_path / "run" / "checkpoints" / "step_2" / ckpt.COMPLETE_MARKER, process, log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) == 128 + signal.SIGTERM
    last = log.read_text().strip().splitlines()[-1]
    match = re.fullmatch(r"vlp: stopped: stopped by SIGTERM at step (\d+); checkpoint saved at (\S+) "
                         r"\(continue with --resume\)", last)
    assert match, last
    step = int(match.group(1))
    assert 2 < step < STEPS and Path(match.group(2)) == tmp_path / "run" / "checkpoints" / f"step_{step}"
    assert ckpt.load_trainer_state(Path(match.group(2)) / "trainer_state.pt")["step"] == step
    assert not (tmp_path / "run" / "final").exists()
    _resume_and_compare(tmp_path / "run", straight)


# ---------------------------------------------------------------- memory over a long run

def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_resident_memory_stays_flat_over_1000_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real, rss = loop._optimizer_step, {}

    def measuring_step(config: Any, module: Any, optimizer: Any, state: Any) -> bool:
        if state.step + 1 in (100, 1000):
            rss[state.step + 1] = _rss_bytes()
        return real(config, module, optimizer, state)

    monkeypatch.setattr(loop, "_optimizer_step", measuring_step)
    config = load_config(DEMO, ["train.max_steps=1000", "train.checkpoint_every=250", "train.log_every=10"])
    pretrain(config, output_dir=tmp_path)
    growth = rss[1000] / rss[100] - 1
    print(f"RSS after step 100: {rss[100] / 2**20:.1f} MiB, after step 1000: {rss[1000] / 2**20:.1f} MiB "
          f"({growth:+.2%})")
    assert abs(growth) < 0.05
