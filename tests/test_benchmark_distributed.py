"""`vlp benchmark` under torchrun (2 CPU ranks, gloo) gives the numbers of one process: retrieval through
vlp.eval.distributed, zero-shot over webdataset shards read by every rank, pair scoring and the linear probe
sharded by index. Run by hand: `.venv/bin/python -m pytest -m slow tests/test_benchmark_distributed.py`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from tests.benchmark_cases import (
    tiny_checkpoint,
    write_imagefolder,
    write_karpathy,
    write_sugarcrepe,
    write_wds_classification,
)
from vlp.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow  # a torchrun launch of 2 ranks plus one process: about 30 s on 2 free cores
def test_two_ranks_give_the_numbers_of_one_process(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    data = write_karpathy(tmp_path / "flickr")
    sugar, coco = write_sugarcrepe(tmp_path / "sugar")
    folder = write_imagefolder(tmp_path / "folder")
    suite = tmp_path / "suite.yaml"
    suite.write_text(json.dumps({"name": "sharded", "defaults": {"batch_size": 4}, "tasks": {
        "retrieval": {"type": "retrieval", "data": str(data), "image_root": str(data.parent), "k_test": 3},
        "zeroshot": {"type": "zeroshot", "format": "wds", "data": str(write_wds_classification(tmp_path / "wds")),
                     "itm_k": 2},
        "sugarcrepe": {"type": "sugarcrepe", "data": str(sugar), "image_root": str(coco)},
        "probe": {"type": "linear_probe", "train": str(folder), "test": str(folder), "epochs": 2},
    }}))
    args = ["benchmark", str(suite), "--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "-m", "vlp.cli.main", *args, "--output", str(tmp_path / "two")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and two["failed"] == []
    for task, entry in one["tasks"].items():
        expected = entry["runs"]["tiny"]["metrics"]
        assert two["tasks"][task]["runs"]["tiny"]["metrics"] == pytest.approx(expected), task
