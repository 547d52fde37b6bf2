"""Hand-run check of ITM re-ranking over seeds: pretrain the demo config with several seeds and compare the
R@1 of ITC ranking and ITM re-ranking in both directions (mean and spread over the seeds).

    .venv/bin/python benchmarks/itm_seeds.py [--seeds 0 1 2] [--out runs/itm_seeds]

Each seed is a full demo run (about 6 minutes on 2 free cores); the summary goes to
``benchmarks/results/itm_seeds.json`` and stdout. Not a timing benchmark: it measures learning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECTIONS = {"text->image": "img_r1", "image->text": "txt_r1"}
LEFT_PRIOR = 0.60  # an ITM loss below this has left the 1:2 label prior (0.637)


def run_seed(seed: int, out: Path, config: str, overrides: list[str], reuse: bool = False) -> dict[str, float]:
    run_dir = out / f"seed_{seed}"
    if not (reuse and (run_dir / "eval_retrieval.json").is_file()):
        train(seed, run_dir, config, overrides)
    return read_run(run_dir)


def train(seed: int, run_dir: Path, config: str, overrides: list[str]) -> None:
    command = [sys.executable, "-m", "vlp.cli.main", "pretrain", config, "--output-dir", str(run_dir), "--overwrite",
               "--set", f"train.seed={seed}", "--set", "train.progress=false"]
    for override in overrides:
        command += ["--set", override]
    subprocess.run(command, check=True, cwd=ROOT)


def read_run(run_dir: Path) -> dict[str, float]:
    result = json.loads((run_dir / "eval_retrieval.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if "itm" in m]  # each record: the mean over its logging window
    last = train[-1]
    row = {f"{scorer} {direction}": float(result[scorer][key])
           for scorer in ("itc", "itm") for direction, key in DIRECTIONS.items()}
    row["itm_loss_final"] = float(last["itm"])
    row["itm_acc_pos_final"] = float(last.get("itm_acc_pos", float("nan")))
    below = [m["step"] for m in train if m["itm"] < LEFT_PRIOR]
    row["itm_first_step_below_0.60"] = float(below[0]) if below else float("nan")
    return row


def summarize(rows: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = next(iter(rows.values())).keys()
    summary: dict[str, dict[str, float]] = {}
    for key in keys:
        values = [row[key] for row in rows.values()]
        summary[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
                        "std": statistics.pstdev(values)}
    for direction in DIRECTIONS:
        gains = [row[f"itm {direction}"] - row[f"itc {direction}"] for row in rows.values()]
        summary[f"itm - itc {direction}"] = {"mean": statistics.fmean(gains), "min": min(gains), "max": max(gains),
                                             "std": statistics.pstdev(gains)}
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default: 0 1 2)")
    parser.add_argument("--config", default="configs/pretrain/demo.yaml", help="pretrain config (default: the demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "itm_seeds", help="run directories (default: runs/itm_seeds)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every seed (repeatable)")
    parser.add_argument("--reuse", action="store_true",
                        help="summarize seeds whose run directory already holds eval_retrieval.json instead of "
                             "training them again (default: off)")
    args = parser.parse_args()
    rows = {seed: run_seed(seed, args.out, args.config, args.overrides, args.reuse) for seed in args.seeds}
    summary = summarize(rows)
    report = {"config": args.config, "overrides": args.overrides, "seeds": rows, "summary": summary}
    target = ROOT / "benchmarks" / "results" / "itm_seeds.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'R@1':<24}" + "".join(f"seed {s:<6}" for s in args.seeds) + "mean    spread")
    for key, stats in summary.items():
        cells = "".join(f"{rows[s][key]:<11.1f}" for s in args.seeds) if key in rows[args.seeds[0]] else \
            " " * 11 * len(args.seeds)
        print(f"{key:<24}{cells}{stats['mean']:<8.2f}{stats['min']:.1f}..{stats['max']:.1f}")
    print(f"written: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
