"""Weight EMA (train.ema_decay): timm ModelEmaV3's rule, checkpoints, final_ema/, evaluation, kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3
from torch import nn

from vlp.config import load_config
from vlp.errors import ConfigError
from vlp.models import VLPModel
from vlp.train import checkpoint as ckpt
from vlp.train.ema import EMA_FILE, WeightEMA, ema_decay_at
from vlp.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/pretrain/demo_tiny.yaml"
ALBEF = ROOT / "configs/pretrain/albef_4m_tiny.yaml"  # every head trained: FSDP resumes need optimizer state for all
DECAY = 0.8  # large steps for a tiny run: the average stays visibly apart from the weights


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))


def _train_steps(model: nn.Module, steps: int, after_step: object) -> list[dict[str, torch.Tensor]]:
    """SGD on random data; ``after_step(step)`` after each optimizer step; returns the weights after each."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    history = []
    for step in range(1, steps + 1):
        x = torch.randn(16, 4)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        after_step(step)  # type: ignore[operator]
        history.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return history


@pytest.mark.parametrize("settings", [
    {}, {"start_step": 3}, {"warmup": True}, {"warmup": True, "gamma": 2.0, "power": 0.75, "min_decay": 0.5},
])
def test_decay_schedule_is_timms(settings: dict[str, float]) -> None:
    names = {"start_step": "update_after_step", "warmup": "use_warmup", "gamma": "warmup_gamma",
             "power": "warmup_power", "min_decay": "min_decay"}
    reference = ModelEmaV3(nn.Linear(1, 1), decay=0.999, **{names[k]: v for k, v in settings.items()})
    for step in [0, 1, 2, 3, 4, 5, 10, 100, 10_000, 10**7]:
        assert ema_decay_at(step, 0.999, **settings) == reference.get_decay(step), step  # type: ignore[arg-type]


@pytest.mark.parametrize("warmup", [False, True])
def test_updates_equal_timm_model_ema_v3_bit_for_bit(warmup: bool) -> None:
    model = _small_model()
    reference = ModelEmaV3(model, decay=DECAY, use_warmup=warmup)
    ours = WeightEMA(model, DECAY, warmup=warmup)

    def update(step: int) -> None:
        reference.update(model, step=step)
        ours.update(step)

    _train_steps(model, 6, update)
    expected = reference.module.state_dict()
    got = ours.state_dict()
    assert got.keys() == {k for k in expected}  # parameters and buffers (BatchNorm statistics too)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    assert not torch.equal(got["0.weight"], model.state_dict()["0.weight"])


def test_average_after_k_steps_equals_the_hand_computed_one() -> None:
    model = _small_model()
    ema = WeightEMA(model, DECAY, every=2, start_step=1)
    history = _train_steps(model, 7, ema.update)
    # updates after steps 2, 4, 6; t = step - start_step - 1 = 0 at step 2: a copy, then the plain decay
    expected = history[1]["0.weight"].double()
    for step in (4, 6):
        expected = DECAY * expected + (1 - DECAY) * history[step - 1]["0.weight"].double()
    torch.testing.assert_close(ema.state_dict()["0.weight"].double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(ema.state_dict()["1.num_batches_tracked"], history[5]["1.num_batches_tracked"])  # copied


def test_swap_puts_the_average_in_and_restores_the_weights_exactly() -> None:
    model = _small_model()
    ema = WeightEMA(model, DECAY)
    _train_steps(model, 3, ema.update)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_into():
        inside = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(inside[k], v) for k, v in ema.state_dict().items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_frozen_parameters_are_not_copied() -> None:
    model = _small_model()
    model[0].requires_grad_(False)
    ema = WeightEMA(model, DECAY)
    assert "0.weight" not in ema.state_dict() and "3.weight" in ema.state_dict()


# ---------------------------------------------------------------------------------------------- in training
def _args(*extra: str) -> list[str]:
    return ["train.max_steps=3", "train.checkpoint_every=1", "train.keep_last=5", f"train.ema_decay={DECAY}",
            *extra]


def test_training_keeps_the_average_in_checkpoints_and_final_ema(tmp_path: Path) -> None:
    run = pretrain(load_config(DEMO, _args("eval.every=0")), output_dir=tmp_path / "run")
    steps = [load_file(str(run / "checkpoints" / f"step_{s}" / "model.safetensors")) for s in (1, 2, 3)]
    final_ema = load_file(str(run / "final_ema" / "model.safetensors"))
    assert final_ema.keys() == steps[2].keys()
    key = "image_encoder.blocks.0.attn.qkv.weight" if "image_encoder.blocks.0.attn.qkv.weight" in final_ema else next(
        k for k in final_ema if k.startswith("image_encoder.blocks.0") and final_ema[k].ndim == 2)
    expected = steps[0][key].double()  # the first update copies the weights
    for state in steps[1:]:
        expected = DECAY * expected + (1 - DECAY) * state[key].double()
    torch.testing.assert_close(final_ema[key].double(), expected, rtol=0, atol=1e-6)
    saved = load_file(str(run / "checkpoints" / "step_3" / EMA_FILE))
    assert torch.equal(saved[key], final_ema[key])
    assert not torch.equal(final_ema[key], load_file(str(run / "final" / "model.safetensors"))[key])
    VLPModel.from_pretrained(run / "final_ema")  # a plain checkpoint for every vlp command
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["ema_decay"] for r in records if "ema_decay" in r] == [0.0, DECAY, DECAY]
    final = [r for r in records if any(k.startswith("eval_ema/") for k in r)]
    assert final and any(k.startswith("eval/") for k in final[-1])  # eval.weights: both
    logged = json.loads((run / "eval_ema.json").read_text())
    assert logged and logged.keys() == {k for k in final[-1] if k.startswith("eval_ema/")}
    # the EMA's result files beside the online ones, each holding its own weights' numbers
    ema_result = json.loads((run / "eval_retrieval_ema.json").read_text())
    online_result = json.loads((run / "eval_retrieval.json").read_text())
    assert logged["eval_ema/itc/txt_r1"] == ema_result["itc"]["txt_r1"]
    assert final[-1]["eval/itc/txt_r1"] == online_result["itc"]["txt_r1"]


def test_eval_weights_ema_evaluates_only_the_average(tmp_path: Path) -> None:
    run = pretrain(load_config(DEMO, _args("eval.every=0", "eval.weights=ema", "train.max_steps=1")),
                   output_dir=tmp_path / "run")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in records for k in r}
    assert any(k.startswith("eval_ema/") for k in keys) and not any(k.startswith("eval/") for k in keys)


@pytest.mark.parametrize("override, fragment", [
    ("train.ema_decay=1.0", "train.ema_decay"), ("train.ema_every=0", "train.ema_every"),
    ("eval.weights=average", "eval.weights"),
])
def test_bad_ema_settings_are_one_error(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        load_config(DEMO, [override])
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config(DEMO, ["train.ema_decay=0.9", "train.lora_rank=2"])


# ----------------------------------------------------------------------------------------- kill and resume
KILL_STEPS = ["train.max_steps=5", "train.checkpoint_every=2", "data.synthetic_train_size=24",
              f"train.ema_decay={DECAY}", "train.ema_warmup=true", "train.ema_every=2"]
# holds the run at its step-3 EMA update (after the step-2 checkpoint), so the kill lands mid-run
HOLD = """
import pathlib, sys, time
import vlp.train.ema as ema
real = ema.WeightEMA.update
def update(self, step):
    if step == 4:
        pathlib.Path(sys.argv[1]).write_text("held")
        time.sleep(600)
    real(self, step)
ema.WeightEMA.update = update
from vlp.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_then_resume_gives_the_same_average_bit_for_bit(tmp_path: Path) -> None:
    straight = pretrain(load_config(DEMO, KILL_STEPS), output_dir=tmp_path / "straight")
    marker, run, log = tmp_path / "held", tmp_path / "run", tmp_path / "stderr.txt"
    command = [sys.executable, "-c", HOLD, str(marker), "pretrain", str(DEMO), "--output-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command + [a for s in KILL_STEPS for a in ("--set", s)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the run never reached step 4"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait(60) == -signal.SIGKILL
    assert ckpt.latest_checkpoint(run / "checkpoints") == run / "checkpoints" / "step_2"
    assert (run / "checkpoints" / "step_2" / EMA_FILE).is_file()
    pretrain(load_config(DEMO, KILL_STEPS), output_dir=run, resume=True)
    for name in ("final_ema/model.safetensors", "final/model.safetensors", f"checkpoints/step_4/{EMA_FILE}"):
        expected, got = load_file(str(straight / name)), load_file(str(run / name))
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(expected[k], got[k]) for k in expected), name


# ------------------------------------------------------------------------------------------- FSDP (2 ranks)
def _torchrun(run_dir: Path, *overrides: str, resume: bool = False) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "vlp.cli.main", "pretrain", str(ALBEF), "--output-dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command + [a for o in overrides for a in ("--set", o)] + (["--resume"] if resume else []),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_average_matches_ddp_and_resumes_exactly(tmp_path: Path) -> None:
    common = ("train.max_steps=4", "train.checkpoint_every=2", "data.synthetic_train_size=48",
              f"train.ema_decay={DECAY}")
    _torchrun(tmp_path / "ddp", *common)
    _torchrun(tmp_path / "fsdp", *common, "train.fsdp=true")
    ddp = load_file(str(tmp_path / "ddp" / "final_ema" / "model.safetensors"))
    fsdp = load_file(str(tmp_path / "fsdp" / "final_ema" / "model.safetensors"))
    assert ddp.keys() == fsdp.keys()
    assert max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp) < 1e-5
    online = load_file(str(tmp_path / "fsdp" / "final" / "model.safetensors"))
    assert any(not torch.equal(online[k], fsdp[k]) for k in fsdp)
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "fsdp" / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    _torchrun(resumed, *common, "train.fsdp=true", resume=True)
    again = load_file(str(resumed / "final_ema" / "model.safetensors"))
    assert all(torch.equal(fsdp[k], again[k]) for k in fsdp)


def test_the_average_never_changes_training(tmp_path: Path) -> None:
    plain = pretrain(load_config(DEMO, ["train.max_steps=3"]), output_dir=tmp_path / "plain")
    averaged = pretrain(load_config(DEMO, ["train.max_steps=3", f"train.ema_decay={DECAY}"]),
                        output_dir=tmp_path / "ema")
    expected, got = (load_file(str(run / "final" / "model.safetensors")) for run in (plain, averaged))
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not (plain / "final_ema").exists() and (averaged / "final_ema").is_dir()
