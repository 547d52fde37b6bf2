"""Every ``vlp`` command with bad input: one line on stderr naming the key, flag, file or value; exit code 2;
no traceback (``--debug`` shows one); a pretraining run fails before it creates anything.

The table in docs/reliability.md lists these inputs and messages.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vlp.cli.main import main
from vlp.config import load_config
from vlp.data.synthetic import write_synthetic
from vlp.errors import UserError
from vlp.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/pretrain/demo_tiny.yaml"
VQA = ROOT / "configs/finetune/vqa_tiny.yaml"
RETRIEVAL = ROOT / "configs/finetune/retrieval_tiny.yaml"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a second thread only spins on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A checkpoint (untrained tiny ALBEF), the synthetic data in every file format, and broken files."""
    root = tmp_path_factory.mktemp("cli")
    write_synthetic(root / "data", train_size=4, test_size=4, image_size=16)
    build_model(load_config(CONFIG).model).save_pretrained(root / "ckpt")
    (root / "bad.yaml").write_text("optim: {lr: [1,\n")
    (root / "list.yaml").write_text("- 1\n")
    (root / "typo.yaml").write_text("optim: {lr_rate: 0.1}\n")
    (root / "dup.yaml").write_text("optim:\n  lr: 0.1\n  lr: 0.2\n")
    (root / "nopreset.yaml").write_text("model: no_such_preset\n")
    (root / "bad.json").write_text('[{"image": 1,')
    (root / "object.json").write_text('{"a": 1}')
    (root / "file").write_text("not a directory and not an image")
    (root / "empty").mkdir()
    return {"C": str(CONFIG), "VQA": str(VQA), "RET": str(RETRIEVAL), "T": str(root), "D": str(root / "data"),
            "CKPT": str(root / "ckpt")}


def _sets(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


EVAL = ["--checkpoint", "{CKPT}", "--image-root", "{D}"]
CLIP = "model.text.tokenizer=clip"  # own data needs a tokenizer that covers it
# (arguments, a fragment of the one-line message); {X} are replaced by the fixture's paths
CASES: list[tuple[list[str], str]] = [
    # --- pretrain: the config file and --set overrides
    (["pretrain", "no/such.yaml"], "file not found: no/such.yaml"),
    (["pretrain", "{T}/bad.yaml"], "bad.yaml: line 2 is not valid YAML"),
    (["pretrain", "{T}/list.yaml"], "list.yaml: a config must be a YAML mapping"),
    (["pretrain", "{T}/typo.yaml"], "unknown config key 'optim.lr_rate'; did you mean 'optim.lr'?"),
    (["pretrain", "{C}", *_sets("optim.lr_rate=0.1")], "unknown config key 'optim.lr_rate'; did you mean 'optim.lr'?"),
    (["pretrain", "{C}", *_sets("data.batchsize=8")], "did you mean 'data.batch_size'?"),
    (["pretrain", "{C}", *_sets("optim.lr")], "--set expects key.sub=value, got 'optim.lr'"),
    (["pretrain", "{C}", *_sets("train.max_steps=many")], "config key 'train.max_steps' expects int, got 'many'"),
    (["pretrain", "{C}", *_sets("train.progress=maybe")], "config key 'train.progress' expects bool"),
    (["pretrain", "{C}", *_sets("optim.lr=-0.1")], "config key 'optim.lr' = -0.1: must be positive"),
    (["pretrain", "{C}", *_sets("data.batch_size=0")], "config key 'data.batch_size' = 0: must be positive"),
    (["pretrain", "{C}", *_sets("model.fusion.num_heads=3")],
     "config key 'model.fusion.num_heads' = 3: fusion width 32 is not divisible by it"),
    (["pretrain", "{C}", *_sets("data.max_bad_fraction=2")], "'data.max_bad_fraction' = 2.0: must be in [0, 1]"),
    (["pretrain", "{C}", *_sets("eval.k_test=0")], "config key 'eval.k_test' = 0: must be positive"),
    (["pretrain", "{T}/dup.yaml"], "dup.yaml: duplicate key 'lr' at line 3 (first at line 2)"),
    (["pretrain", "{T}/nopreset.yaml"], "model preset not found: no_such_preset"),
    (["pretrain", "{C}", *_sets("model.image.type=resnet")], "unknown image encoder 'resnet'"),
    (["pretrain", "{C}", *_sets("model.text.tokenizer=/no/such/tok.json")], "tokenizer '/no/such/tok.json' is not"),
    (["pretrain", "{C}", *_sets("train.device=cuda")], "cuda"),
    # --- pretrain: data that is not there
    (["pretrain", "{C}", *_sets("data.source=parquet")], "data.source: unknown dataset 'parquet'"),
    (["pretrain", "{C}", *_sets("data.source=json", "data.train={D}/train.jsonl", "data.image_root={D}")],
     "data.source is 'json' but model.text.tokenizer is 'synthetic'"),
    (["pretrain", "{C}", *_sets("data.source=json", CLIP)], "data.train is empty"),
    (["pretrain", "{C}", *_sets("data.source=json", "data.train=missing.jsonl", CLIP)],
     "data.train: file not found: missing.jsonl"),
    (["pretrain", "{C}", *_sets("data.source=json", "data.train={D}/train.jsonl", "data.image_root=nowhere", CLIP)],
     "data.image_root: directory not found: nowhere"),
    (["pretrain", "{C}", *_sets("data.source=json", "data.train={T}/bad.json", "data.image_root={D}", CLIP)],
     "bad.json:1: malformed JSON"),
    (["pretrain", "{C}", *_sets("data.source=hf", "data.train=nowhere", CLIP)], "data.train: directory not found: nowhere"),
    (["pretrain", "{C}", *_sets("data.source=webdataset", "data.train=nowhere/shard-{{000..001}}.tar", CLIP)],
     "shard not found: nowhere/shard-000.tar (2 of 2 missing)"),
    (["pretrain", "{C}", *_sets("data.test={D}/missing.json", "eval.every=0")], "data file not found"),
    # --- arguments
    ([], "the following arguments are required: command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["pretrain", "{C}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    # --- finetune
    (["finetune", "vqa", "{VQA}", "--init", "nowhere"], "--init: directory not found: nowhere"),
    (["finetune", "retrieval", "{RET}", "--init", "{T}/empty"], "--init: not a vlp checkpoint (no config.yaml)"),
    (["finetune", "vqa", "no.yaml", "--init", "{CKPT}"], "CONFIG: not found: no.yaml"),
    (["finetune", "captioning", "{VQA}", "--init", "{CKPT}"], "invalid choice: 'captioning'"),
    (["finetune", "vqa", "{VQA}", "--init", "{CKPT}", *_sets("vqa.num_answers=0")], "vqa.num_answers must be >= 1"),
    (["finetune", "vqa", "{VQA}", "--init", "{CKPT}", *_sets("optim.lr=-1")], "'optim.lr' = -1.0: must be positive"),
    (["finetune", "vqa", "{VQA}", "--init", "{CKPT}", *_sets("vqa.train=missing.json")], "not found: missing.json"),
    # --- eval retrieval / vqa / zeroshot
    (["eval", "retrieval", "--checkpoint", "nowhere", "--data", "{D}/test.json", "--image-root", "{D}"],
     "--checkpoint: directory not found: nowhere"),
    (["eval", "retrieval", *EVAL, "--data", "missing.json"], "--data: not found: missing.json"),
    (["eval", "retrieval", "--checkpoint", "{CKPT}", "--data", "{D}/test.json", "--image-root", "nowhere"],
     "--image-root: directory not found: nowhere"),
    (["eval", "retrieval", *EVAL, "--data", "{D}/test.json", "--k-test", "0"], "--k-test = 0: must be positive"),
    (["eval", "retrieval", *EVAL, "--data", "{T}/bad.json"], "bad.json:1: malformed JSON"),
    (["eval", "retrieval", *EVAL, "--data", "{D}/vqa_test.json"], "vqa_test.json: entry 0: missing key 'caption'"),
    (["eval", "retrieval", *EVAL, "--data", "{D}/test.json", "--batch-size", "many"],
     "argument --batch-size: invalid int value: 'many'"),
    (["eval", "retrieval", *EVAL, "--data", "{D}/test.json", "--precision", "fp8"], "invalid choice: 'fp8'"),
    (["eval", "vqa", *EVAL, "--data", "{D}/test.json"], "test.json: entry 0: missing key 'question_id'"),
    (["eval", "vqa", *EVAL, "--data", "{D}/vqa_test.json"], "not a VQA checkpoint"),
    (["eval", "zeroshot", *EVAL, "--data", "{D}/zeroshot.json"], "the following arguments are required: --classes"),
    (["eval", "zeroshot", *EVAL, "--data", "{D}/zeroshot.json", "--classes", "missing.json"],
     "--classes: not found: missing.json"),
    (["eval", "zeroshot", *EVAL, "--data", "{D}/zeroshot.json", "--classes", "{T}/object.json"],
     "object.json: expected a non-empty JSON list of class names"),
    (["eval", "zeroshot", *EVAL, "--data", "{D}/zeroshot.json", "--classes", "{D}/classes.json",
      "--templates", "{T}/object.json"], "has no '{{}}' for the class name"),
    # --- data synth
    (["data", "synth", "--out", "{T}/o", "--train-size", "-1"], "--train-size/--test-size must be positive"),
    (["data", "synth", "--out", "{T}/file", "--train-size", "2", "--test-size", "2"], "--out: not a directory"),
    (["data", "synth", "--out", "{T}/o", "--train-size", "2", "--test-size", "2", "--image-size", "0"],
     "image_size >= 12"),
    (["data", "synth"], "the following arguments are required: --out"),
    (["data", "synth", "--out", "{D}", "--train-size", "2", "--test-size", "2"],
     "is not empty (files of the same name would be replaced); use --force"),
]
OPTIONAL = [  # commands whose modules other work adds: checked when present
    ("report", ["report", "nowhere"], "run directory not found: nowhere"),
    ("report", ["report", "{T}/empty"], "not a vlp run directory"),
    ("explain", ["explain", "--checkpoint", "{CKPT}", "--image", "nowhere.png", "--text", "a"],
     "image not found: nowhere.png"),
    ("explain", ["explain", "--checkpoint", "{CKPT}", "--image", "{T}/file", "--text", "a"], "unreadable image"),
    ("convert", ["convert", "--from", "clip", "nowhere", "--out", "{T}/conv"], "nowhere is not a local"),
    ("convert", ["convert", "--from", "clip", "{T}/empty", "--out", "{T}/conv"], "has no config.json"),
]


def _fails_with_one_line(args: list[str], fragment: str, paths: dict[str, str],
                         capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [a.format(**paths) for a in args]
    if argv[:1] == ["pretrain"] and len(argv) > 1:
        argv += ["--output-dir", str(tmp_path / "run")]
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]  # the log
    assert code == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("vlp: error: "), err
    assert fragment.format(**paths) in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # failed before the run wrote anything


@pytest.mark.parametrize("args, fragment", CASES, ids=[f"{i:02d}-{' '.join(a[:2])}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_exit_2(args: list[str], fragment: str, paths: dict[str, str],
                                          capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails_with_one_line(args, fragment, paths, capsys, tmp_path)


@pytest.mark.parametrize("module, args, fragment", OPTIONAL, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(OPTIONAL)])
def test_other_commands_bad_input(module: str, args: list[str], fragment: str, paths: dict[str, str],
                                  capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if importlib.util.find_spec(f"vlp.{module}") is None:
        pytest.skip(f"vlp.{module} is not part of this tree yet")
    _fails_with_one_line(args, fragment, paths, capsys, tmp_path)


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="file not found: no/such.yaml"):
        main(["pretrain", "no/such.yaml", "--debug"])
    with pytest.raises(UserError, match="'optim.lr' = -1.0"):
        main(["--debug", "pretrain", str(CONFIG), "--set", "optim.lr=-1"])


def test_console_script_exit_code_and_no_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("vlp")
    assert script.is_file(), "the package is installed with its console script"
    args = [str(script), "pretrain", str(CONFIG), "--set", "optim.lr=-1", "--output-dir", str(tmp_path / "run")]
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == "vlp: error: config key 'optim.lr' = -1.0: must be positive"  # nothing else
    assert not (tmp_path / "run").exists()
