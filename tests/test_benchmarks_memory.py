"""benchmarks/bench_memory.py at tiny sizes (--smoke): every configuration runs, the JSON holds the figures
and per-case numbers, and the measured peaks behave as they must even at tiny sizes."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_memory_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    threads = torch.get_num_threads()
    try:
        bench = importlib.import_module("bench_memory")
        assert bench.main(["--smoke", "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        sys.path.remove(str(BENCHMARKS))
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "bench_memory.json").read_text())
    printed = capsys.readouterr().out
    figures, cases = result["figures"], result["details"]["cases"]
    for key in ("checkpointing_activation_reduction", "checkpointing_time_cost", "chunked_32_vs_unchunked_8_peak",
                "chunking_time_cost_per_sample"):
        assert figures[key]["value"] > 0 and f"[bench_memory] {key}:" in printed
    assert figures["chunked_32_vs_unchunked_8_peak"]["target"] == 1.5
    peaks = {name: case["peak_activation_bytes"] for name, case in cases.items()}
    # checkpointing and chunking lower the peak; a batch of 32 at once needs more than in chunks of 8
    assert peaks["base_checkpointed"] < peaks["base_plain"]
    assert peaks["small_batch32_chunk8_checkpointed"] < peaks["small_batch32_chunk8"] < peaks["small_batch32"]
    assert peaks["small_batch8"] > 0
    assert all(case["rss_peak_growth_bytes"] is None for case in cases.values())  # in-process: no RSS figure
