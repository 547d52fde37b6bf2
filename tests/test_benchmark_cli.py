"""`vlp benchmark` end to end: the shipped synthetic suite over a demo-like pretrained checkpoint and a converted
open_clip model, and failure isolation (one line per failed task, the others run, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from vlp.cli.main import main
from vlp.convert import convert

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "synth"
    assert main(["data", "synth", "--out", str(out), "--train-size", "0", "--test-size", "40", "--image-size", "32",
                 "--benchmarks"]) == 0
    return out


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("bench") / "demo"
    assert main(["pretrain", str(ROOT / "configs/pretrain/demo_tiny.yaml"), "--output-dir", str(run)]) == 0
    return run / "final"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import open_clip

    cfg: dict[str, Any] = {"embed_dim": 16, "quick_gelu": True,
                           "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
                           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("bench") / "open_clip"
    src.mkdir(exist_ok=True)
    safetensors.torch.save_file(open_clip.CLIP(**cfg).state_dict(), str(src / "open_clip_model.safetensors"))
    (src / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    convert("open_clip", src, src.parent / "clip")
    return src.parent / "clip"


def synthetic_sets(synth: Path) -> list[str]:
    pairs = {"retrieval.data": synth / "test.json", "retrieval.image_root": synth,
             "sugarcrepe.data": synth / "benchmarks/sugarcrepe", "sugarcrepe.image_root": synth,
             "zeroshot_color.data": synth / "benchmarks/zeroshot_color",
             "zeroshot_shape.data": synth / "benchmarks/zeroshot_shape"}
    return [arg for key, value in pairs.items() for arg in ("--set", f"tasks.{key}={value}")]


def test_synthetic_benchmark_files_are_in_sugarcrepe_and_imagefolder_layout(synth: Path) -> None:
    for category in ("swap_att", "swap_obj"):
        records = json.loads((synth / "benchmarks/sugarcrepe" / f"{category}.json").read_text())
        assert records and all(set(r) == {"filename", "caption", "negative_caption"} for r in records.values())
        for record in records.values():
            assert (synth / record["filename"]).is_file() and record["caption"] != record["negative_caption"]
            # a swap keeps the words: only their arrangement differs
            assert sorted(record["caption"].replace(",", "").split()) == sorted(
                record["negative_caption"].replace(",", "").split())
    folder = synth / "benchmarks/zeroshot_color"
    names = (folder / "classnames.txt").read_text().split("\n")[:-1]
    assert names == sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert all("{c}" in t for t in (folder / "zeroshot_classification_templates.txt").read_text().splitlines())


def test_shipped_synthetic_suite_over_a_pretrained_and_a_converted_checkpoint(
        synth: Path, demo_like: Path, converted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["benchmark", str(ROOT / "configs/benchmarks/synthetic.yaml"), "--checkpoint", str(demo_like),
                 "--checkpoint", str(converted), "--output", str(out), "--device", "cpu", "--no-progress",
                 "--set", "tasks.retrieval.k_test=4", *synthetic_sets(synth)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    fused, dual = results["checkpoints"]
    assert results["failed"] == [] and (out / "results.png").stat().st_size > 0
    rows = {(row["task"], row["metric"]): row["values"] for row in results["rows"]}
    for metric in ("itc/img_r1", "itm/img_r1", "itm+itc/txt_r1", "itm+itc_logit/img_r1"):
        assert 0.0 <= rows[("retrieval", metric)][fused] <= 100.0
    assert rows[("retrieval", "itc/img_r1")][dual] is not None and rows[("retrieval", "itm/img_r1")][dual] is None
    for task, metric in (("sugarcrepe", "itc/swap_att"), ("sugarcrepe", "itm/swap_obj"),
                         ("zeroshot_color", "itm/top1"), ("zeroshot_shape", "itc/mean_per_class_recall")):
        assert 0.0 <= rows[(task, metric)][fused] <= 100.0
    protocol = results["tasks"]["retrieval"]["runs"][fused]["protocol"]
    assert protocol["k_test"] == 4 and protocol["precision"] == "fp32" and protocol["image_size"] == 32
    assert results["tasks"]["zeroshot_color"]["runs"][dual]["protocol"]["image_size"] == 16
    markdown = (out / "results.md").read_text()
    assert f"| task | metric | {fused} | {dual} |" in markdown and "| sugarcrepe | itm/swap_att |" in markdown
    assert "## Protocol" in markdown and "k_test=4" in markdown


def test_a_failing_task_is_one_line_and_the_others_still_run(synth: Path, demo_like: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    folder = synth / "benchmarks/zeroshot_color"
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"name": "mixed", "tasks": {
        "missing": {"type": "winoground", "data": str(tmp_path / "no_such_dir")},
        "malformed": {"type": "order", "data": str(broken), "image_root": str(synth)},
        "unset": {"type": "sugarcrepe"},
        "probe": {"type": "linear_probe", "train": str(folder), "test": str(folder), "epochs": 2},
    }}))
    out = tmp_path / "out"
    code = main(["benchmark", str(suite), "--checkpoint", str(demo_like), "--output", str(out), "--device", "cpu",
                 "--no-progress"])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlp: error:")]
    assert len(errors) == 3
    assert any("'missing'" in e and "no_such_dir" in e for e in errors)
    assert any("'malformed'" in e and str(broken) in e and "malformed JSON" in e for e in errors)
    assert any("'unset'" in e and "--set tasks.unset.data=PATH" in e for e in errors)
    results = json.loads((out / "results.json").read_text())
    probe = results["tasks"]["probe"]["runs"]["final"]
    assert 0.0 <= probe["metrics"]["probe/top1"] <= 100.0 and 7 <= probe["protocol"]["weight_decays_tried"] <= 15
    assert len(results["failed"]) == 3 and "## Failed" in (out / "results.md").read_text()


@pytest.mark.slow
def test_demo_checkpoint_on_the_synthetic_benchmarks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's benchmark figures: run by hand after `make demo` (-s prints the table)."""
    demo = ROOT / "runs/demo/final"
    if not demo.is_dir():
        pytest.skip("no demo checkpoint: run `make demo` first")
    synth = tmp_path / "synth"
    assert main(["data", "synth", "--out", str(synth), "--train-size", "0", "--benchmarks"]) == 0
    out = tmp_path / "out"
    assert main(["benchmark", str(ROOT / "configs/benchmarks/synthetic.yaml"), "--checkpoint", str(demo),
                 "--output", str(out), "--no-progress", *synthetic_sets(synth)]) == 0
    with capsys.disabled():
        print((out / "results.md").read_text())
