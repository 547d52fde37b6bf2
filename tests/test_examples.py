"""Every script in examples/ runs to completion and prints what it promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Lines each example must print; a new example needs an entry here.
MARKERS = {
    "fusion_in_your_model.py": [
        "grad checkpointing: same gradients: OK", "padding invariance: OK", "image_kv cache: 2 layers",
        "text_to_image attention (4, 4, 8, 17)", "single_stream (ViLT): out_dim 64",
        "dual_stream one-way (ALBEF): out_dim 64", "dual_stream co-attention (METER): out_dim 128",
        "fusion example: OK",
    ],
    "python_api.py": ["run directory:", "checkpoints: step_10, step_20", "ITM match probability",
                      "retrieval on 8 images / 40 captions", "python api example: OK"],
}


def run_example(path: Path, *args: str, cwd: Path) -> str:
    # One thread per process: the suite's own process already uses the cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, cwd=cwd,
                            env=env, timeout=600)
    assert result.returncode == 0, f"{path.name} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def test_every_example_has_markers() -> None:
    assert {path.name for path in EXAMPLES} == set(MARKERS)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path, tmp_path: Path) -> None:
    args = ("--out", str(tmp_path / "out")) if path.name == "python_api.py" else ()
    output = run_example(path, *args, cwd=tmp_path)
    for marker in MARKERS[path.name]:
        assert marker in output, f"{path.name} did not print '{marker}':\n{output}"
    if path.name == "fusion_in_your_model.py":
        losses = re.search(r"loss first 20 steps ([\d.]+) -> last 20 steps ([\d.]+)", output)
        accuracy = re.search(r"accuracy after training: ([\d.]+)", output)
        assert losses is not None and accuracy is not None, output
        assert float(losses.group(2)) < float(losses.group(1))
        assert 0.0 <= float(accuracy.group(1)) <= 1.0
    if path.name == "python_api.py":
        for cosine, probability in re.findall(r"ITC cosine ([+-][\d.]+)  ITM match probability ([\d.]+)", output):
            assert -1.0 <= float(cosine) <= 1.0 and 0.0 <= float(probability) <= 1.0
        run_dir = tmp_path / "out" / "run"
        assert (run_dir / "final" / "model.safetensors").is_file()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert max(record["step"] for record in records) == 20
