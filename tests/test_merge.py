"""WiSE-FT (vlp merge): endpoints, interpolation, fine-tuned-only keys, architecture errors, the sweep."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlp.cli.main import main
from vlp.data.synthetic import write_synthetic
from vlp.errors import UserError
from vlp.models import VLPModel
from vlp.train.merge import SweepData, merge_checkpoints, merge_state, sweep

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "configs/models/albef_base_tiny.yaml"


def _checkpoint(directory: Path, seed: int, preset: Path = PRESET) -> Path:
    torch.manual_seed(seed)
    VLPModel.from_config(preset).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("merge")
    zs, ft = _checkpoint(root / "zs", 0), _checkpoint(root / "ft", 1)
    # a task head only the fine-tuned checkpoint has, as a VQA fine-tuning writes it
    save_file({"classifier.weight": torch.randn(3, 4)}, str(ft / "vqa_head.safetensors"))
    (ft / "answers.json").write_text(json.dumps(["yes", "no", "red"]))
    return zs, ft


@pytest.mark.parametrize("alpha, endpoint", [(0.0, "zs"), (1.0, "ft")])
def test_endpoints_equal_the_inputs_exactly(pair: tuple[Path, Path], alpha: float, endpoint: str,
                                            tmp_path: Path) -> None:
    zs, ft = pair
    out = merge_checkpoints(zs, ft, alpha, tmp_path / "out")
    expected = load_file(str((zs if endpoint == "zs" else ft) / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    VLPModel.from_pretrained(out)


def test_interpolation_and_fine_tuned_only_files(pair: tuple[Path, Path], tmp_path: Path) -> None:
    zs, ft = pair
    out = merge_checkpoints(zs, ft, 0.3, tmp_path / "out")
    a, b = load_file(str(zs / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(got[key], 0.7 * a[key] + 0.3 * b[key], rtol=0, atol=1e-6)
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert moved and all(not torch.equal(got[k], a[k]) and not torch.equal(got[k], b[k]) for k in moved)
    head = load_file(str(out / "vqa_head.safetensors"))
    assert torch.equal(head["classifier.weight"], load_file(str(ft / "vqa_head.safetensors"))["classifier.weight"])
    assert (out / "answers.json").read_text() == (ft / "answers.json").read_text()
    assert (out / "tokenizer").is_dir()
    import yaml

    record = yaml.safe_load((out / "config.yaml").read_text())["wise_ft"]
    assert record == {"alpha": 0.3, "zero_shot": str(zs), "fine_tuned": str(ft)}


def test_keys_only_in_the_fine_tuned_state_are_copied_and_shape_mismatch_fails() -> None:
    zs = {"w": torch.zeros(2, 2), "step": torch.tensor(3)}
    ft = {"w": torch.ones(2, 2), "step": torch.tensor(7), "head.weight": torch.full((3,), 2.0)}
    merged = merge_state(zs, ft, 0.25)
    assert torch.equal(merged["w"], torch.full((2, 2), 0.25))
    assert torch.equal(merged["head.weight"], ft["head.weight"]) and int(merged["step"]) == 7
    with pytest.raises(UserError, match=r"tensor shapes differ.*w \[2, 2\] vs \[3, 2\]"):
        merge_state(zs, {"w": torch.ones(3, 2)}, 0.5)
    with pytest.raises(UserError, match="only in the zero-shot checkpoint"):
        merge_state({**zs, "extra": torch.ones(1)}, ft, 0.5)


def test_cli_merge_and_its_errors(pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    zs, ft = pair
    assert main(["merge", "--alpha", "0.5", str(zs), str(ft), "--out", str(tmp_path / "half")]) == 0
    assert (tmp_path / "half" / "model.safetensors").is_file()
    other = tmp_path / "other"
    shutil.copytree(zs, other)
    config = (other / "config.yaml").read_text().replace("width: 32", "width: 64", 1)
    (other / "config.yaml").write_text(config)
    capsys.readouterr()
    for args, fragment in [
        (["--alpha", "1.5", str(zs), str(ft)], "every alpha must be in [0, 1]"),
        (["--alpha", "x", str(zs), str(ft)], "expected a number"),
        (["--alpha", "0.5", str(other), str(ft)], "not the same architecture: model.image.width 64 vs 32"),
        (["--alpha", "0.5", str(zs), str(ft), "--retrieval", "test.json"], "need --image-root"),
    ]:
        assert main(["merge", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err, err


def test_sweep_writes_a_table_a_plot_and_the_endpoint_scores(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from vlp.config.schema import EvalConfig
    from vlp.data.retrieval_split import load_retrieval_split
    from vlp.eval.retrieval import evaluate_retrieval

    zs, ft = pair
    files = write_synthetic(tmp_path / "data", train_size=1, test_size=40, image_size=32)
    data = SweepData(image_root=files["root"], retrieval=files["test"], zeroshot=files["zeroshot"],
                     classes=files["classes"], k_test=4, batch_size=32, precision="fp32")
    rows = sweep(zs, ft, [0.0, 0.5, 1.0], tmp_path / "sweep", data, y="itm_img_r1")
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    assert {"zeroshot_top1", "itc_img_r1", "itc_txt_r1", "itm_img_r1", "itm_txt_r1"} <= set(rows[0])
    model = VLPModel.from_pretrained(ft)
    direct = evaluate_retrieval(model, load_retrieval_split(files["test"], files["root"]),
                                model.image_transform(train=False), EvalConfig(k_test=4, batch_size=32,
                                precision="fp32"), progress=False)
    assert rows[-1]["itm_img_r1"] == pytest.approx(direct["itm"]["img_r1"])
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == rows
    table = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()
    assert table[0].startswith("| alpha | zeroshot_top1") and len(table) == 2 + 3
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "alpha_0.50" / "model.safetensors").is_file()
