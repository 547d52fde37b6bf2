"""The benchmark scripts at tiny sizes (so they cannot rot), and the exactness their speedups rest on.

Timings are never asserted here: the scripts report them. These tests check that each script runs,
writes its JSON with every figure, and that the correctness figures (identical ids, identical ranks and
top-k results, equal outputs of vlp and the reference) hold.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def _run(module_name: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    module = __import__(module_name)
    main: Callable[[list[str]], int] = module.main
    threads = torch.get_num_threads()
    try:
        code = main(["--size", "tiny", "--threads", "1", "--out", str(tmp_path), *extra])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result: dict[str, Any] = json.loads((tmp_path / f"{module_name}.json").read_text())
    assert result["benchmark"] == module_name and result["size"] == "tiny"
    assert result["settings"]["threads"] == 1 and "load_average_before" in result
    amx = result["machine"]["amx"]  # vlp's AMX answer, the bare detection and the override, in every JSON
    assert isinstance(amx["vlp_amx_available"], bool) and isinstance(amx["detected"], bool)
    assert "VLP_ASSUME_AMX" in amx
    peaks = result["matmul_peaks"]
    assert peaks["fp32"]["gflops"] > 0 and peaks["bf16"]["gflops"] > 0 and peaks["bf16_over_fp32"] > 0
    for key, figure in result["figures"].items():
        assert isinstance(figure["value"], float) and figure["value"] == figure["value"], key  # not NaN
    return result


@pytest.mark.parametrize("assume_amx", ["0", "1"])
def test_machine_info_records_vlps_amx_answer(monkeypatch: pytest.MonkeyPatch, assume_amx: str) -> None:
    from common import machine_info, run_matmul_peaks

    monkeypatch.setenv("VLP_ASSUME_AMX", assume_amx)
    amx = machine_info()["amx"]
    assert amx["vlp_amx_available"] is (assume_amx == "1") and amx["VLP_ASSUME_AMX"] == assume_amx
    peaks = run_matmul_peaks(512, budget_s=0.0)  # no time for a doubling: both stay at 256
    assert peaks["fp32"]["size"] == peaks["bf16"]["size"] == 256 and peaks["fp32"]["gflops"] > 0


def test_bench_fusion_runs_and_both_sides_compute_the_same_layer(tmp_path: Path) -> None:
    result = _run("bench_fusion", tmp_path, "--reps", "1")
    figures = result["figures"]
    for kind in ("dual", "single"):
        for precision in ("fp32", "bf16"):
            assert figures[f"{kind}_{precision}_time_ratio"]["value"] > 0
            assert figures[f"{kind}_{precision}_vlp_peak_fraction"]["value"] > 0
    differences = result["details"]["max_abs_output_difference_fp32"]
    assert differences["dual"] < 1e-4 and differences["single"] < 1e-4


def test_bench_tokenize_gives_open_clips_ids(tmp_path: Path) -> None:
    result = _run("bench_tokenize", tmp_path)
    assert result["figures"]["identical_ids"]["value"] == 1.0
    assert result["figures"]["speedup_2_threads"]["value"] > 0


def test_bench_retrieval_ranks_match_the_references(tmp_path: Path) -> None:
    figures = _run("bench_retrieval", tmp_path)["figures"]
    assert figures["rerank_identical_order_fp32"]["value"] == 1.0
    assert figures["itc_identical_results"]["value"] == 1.0
    assert figures["itc_memory_over_gallery"]["value"] > 0


def test_bench_data_measures_both_sources(tmp_path: Path) -> None:
    figures = _run("bench_data", tmp_path)["figures"]
    for key in ("train_step_images_per_s", "synthetic_pipeline_over_step", "files_pipeline_over_step"):
        assert figures[key]["value"] > 0


def test_bench_train_counts_flops_and_profiles(tmp_path: Path) -> None:
    result = _run("bench_train", tmp_path)
    assert result["figures"]["clip_bf16_vlp_native_speedup"]["value"] > 0
    assert result["details"]["fused_bf16_flops_per_step"] > 0
    assert "aten::" in result["details"]["fused_bf16_profile"]


@pytest.mark.parametrize(("queries", "gallery", "k", "memory_mb"), [
    (40, 30_000, 16, 1.0),     # many blocks: the group screen runs on every block after the first
    (9, 20_011, 3, 0.2),       # a partial last group in every block
    (5, 4_000, 1, 256.0),      # one block
])
def test_chunked_topk_group_screen_is_exact(queries: int, gallery: int, k: int, memory_mb: float) -> None:
    from vlp.eval.retrieval import chunked_topk

    generator = torch.Generator().manual_seed(queries)
    query_emb, gallery_emb = torch.randn(queries, 24, generator=generator), torch.randn(gallery, 24, generator=generator)
    # A few exact duplicates of the best items: tied scores must not lose or duplicate an item.
    gallery_emb[-3:] = gallery_emb[:3]
    expected_values, expected_indices = (query_emb @ gallery_emb.T).topk(k, dim=1)
    values, indices = chunked_topk(query_emb, gallery_emb, k, memory_mb=memory_mb)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=1e-5)
    scores = query_emb @ gallery_emb.T
    torch.testing.assert_close(scores.gather(1, indices), values, rtol=0, atol=1e-5)
    assert all(len(set(row)) == k for row in indices.tolist())
