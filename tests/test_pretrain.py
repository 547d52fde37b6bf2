from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from vlp.cli.main import main
from vlp.config import load_config
from vlp.train.loop import pretrain

ROOT = Path(__file__).resolve().parents[1]
TINY = sorted((ROOT / "configs" / "pretrain").glob("*_tiny.yaml"))


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("path", TINY, ids=[p.stem for p in TINY])
def test_two_step_pretrain_from_every_tiny_config(path: Path, tmp_path: Path) -> None:
    config = load_config(path, ["train.max_steps=2"])
    run_dir = pretrain(config, output_dir=tmp_path / "run")
    losses = _losses(run_dir)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step_2" / "trainer_state.pt").is_file()
    assert (run_dir / "plots" / "loss.png").is_file()
    assert load_config(run_dir / "config.yaml") == config


def test_same_seed_gives_identical_losses(tmp_path: Path) -> None:
    overrides = ["train.max_steps=3", "train.checkpoint_every=0"]
    config = load_config(ROOT / "configs/pretrain/albef_4m_tiny.yaml", overrides)
    first = _losses(pretrain(config, output_dir=tmp_path / "a"))
    second = _losses(pretrain(config, output_dir=tmp_path / "b"))
    assert first == second
    other = _losses(pretrain(load_config(ROOT / "configs/pretrain/albef_4m_tiny.yaml",
                                         overrides + ["train.seed=1"]), output_dir=tmp_path / "c"))
    assert other != first


class Killed(Exception):
    pass


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_gives_identical_final_weights(tmp_path: Path, accum: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # momentum encoder + queue + MLM + ITM: every piece of state must survive the restart
    base = ["train.max_steps=4", "train.checkpoint_every=2", f"train.grad_accum={accum}",
            "data.synthetic_train_size=40"]  # 40 samples / batch 8 = 5 batches: resume crosses an epoch
    config = load_config(ROOT / "configs/pretrain/albef_4m_tiny.yaml", base)
    straight = pretrain(config, output_dir=tmp_path / "straight")
    # the process dies during step 3, after the step-2 checkpoint; then --resume runs to step 4
    import vlp.train.loop as loop

    real_step = loop._optimizer_step

    def dying_step(config, module, optimizer, state):  # type: ignore[no-untyped-def]
        if state.step == 2:
            raise Killed
        return real_step(config, module, optimizer, state)

    monkeypatch.setattr(loop, "_optimizer_step", dying_step)
    with pytest.raises(Killed):
        pretrain(config, output_dir=tmp_path / "resumed")
    monkeypatch.setattr(loop, "_optimizer_step", real_step)
    assert not (tmp_path / "resumed" / "final").exists()
    pretrain(config, output_dir=tmp_path / "resumed", resume=True)
    a = safetensors.torch.load_file(str(straight / "final" / "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    bad = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not bad, bad
    qa = safetensors.torch.load_file(str(straight / "checkpoints" / "step_4" / "objective.safetensors"))
    qb = safetensors.torch.load_file(str(tmp_path / "resumed" / "checkpoints" / "step_4" / "objective.safetensors"))
    for key in qa:
        torch.testing.assert_close(qa[key], qb[key], atol=0, rtol=0, msg=key)
    assert _losses(straight)[2:] == _losses(tmp_path / "resumed")[-2:]


def test_cli_typo_fails_with_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pretrain", str(ROOT / "configs/pretrain/demo_tiny.yaml"), "--set", "optim.lr_rate=0.1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "optim.lr" in err and "did you mean" in err


@pytest.mark.parametrize("args, fragment", [
    (["pretrain", "no/such/config.yaml"], "no/such/config.yaml"),
    (["pretrain", "CONFIG", "--set", "data.batch_size=0"], "data.batch_size"),
    (["pretrain", "CONFIG", "--set", "model.fusion.num_heads=3"], "model.fusion.num_heads"),
    (["pretrain", "CONFIG", "--set", "optim.lr=-0.1"], "optim.lr"),
    (["eval", "retrieval", "--checkpoint", "nowhere", "--data", "x.json", "--image-root", "."], "nowhere"),
    (["frobnicate"], "frobnicate"),
])
def test_cli_user_errors(args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(ROOT / "configs/pretrain/demo_tiny.yaml") if a == "CONFIG" else a for a in args]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err


def test_cli_pretrain_prints_run_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["pretrain", str(ROOT / "configs/pretrain/demo_tiny.yaml"), "--output-dir", str(tmp_path / "r"),
                 "--set", "train.max_steps=1"])
    assert code == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "r"))


def test_a_training_record_holds_the_mean_of_its_window(tmp_path: Path) -> None:
    # the same run logged every step and every 3 steps: each 3-step record is the mean of its 3 steps
    def records(every: int, name: str) -> list[dict[str, float]]:
        config = load_config(ROOT / "configs/pretrain/albef_4m_tiny.yaml",
                             ["train.max_steps=6", "train.checkpoint_every=0", f"train.log_every={every}"])
        run_dir = pretrain(config, output_dir=tmp_path / name)
        return [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    each, windows = records(1, "each"), records(3, "windows")
    assert [r["step"] for r in windows] == [3, 6]
    for window, end in zip(windows, (3, 6)):
        steps = each[end - 3:end]
        for key in ("loss", "itc", "itm", "itm_acc_pos"):
            assert window[key] == pytest.approx(sum(s[key] for s in steps) / 3, rel=1e-6), key
        assert window["temperature"] == pytest.approx(steps[-1]["temperature"])  # a state: the latest value
    assert each[0]["loss"] != pytest.approx(windows[0]["loss"])  # not the window's first (or any one) step
