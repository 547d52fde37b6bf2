"""One run per run directory: a second run into a directory that holds one is refused unless it continues it
(``--resume``) or replaces it (``--overwrite``).

Without the guard two runs would mix: metrics.jsonl would get a second step 0 after the first run's last
step, ``keep_last`` would prune the new checkpoints while the old ones stayed, and a later ``--resume``
would continue the old run.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from vlp.errors import UserError
from vlp.train.distributed import DistInfo

__all__ = ["RUN_MARKERS", "RUN_OUTPUTS", "prepare_run_dir"]

log = logging.getLogger("vlp")

# what makes a directory a run's: any one of these
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "checkpoints", "final")
# everything vlp writes into a run directory (training, evaluation, report, Makefile's explain.json);
# --overwrite removes these and nothing else, so files of the user's own in the directory stay
RUN_OUTPUTS = (*RUN_MARKERS, "final_ema", "plots", "tensorboard", "eval_retrieval.json", "eval_vqa.json",
               "eval_zeroshot.json", "eval_ema.json", "vqa_predictions.json", "report.html", "explain.json")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, dist: DistInfo | None = None) -> None:
    """Refuse to start a new run in a directory that holds one, or empty it for ``overwrite``; before any work.

    ``resume`` continues what is there (or starts fresh in an empty directory). Only rank 0 deletes; the other
    ranks wait for it.
    """
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other: --resume continues the run in the "
                        "directory, --overwrite deletes it and starts over")
    found = [name for name in RUN_MARKERS if (run_dir / name).exists()]
    if resume or not found:
        return
    listed = ", ".join(f"{name}/" if (run_dir / name).is_dir() else name for name in found)
    if not overwrite:
        raise UserError(f"{run_dir} already holds a run ({listed}): use --resume to continue it or --overwrite "
                        "to start over")
    rank, world = (0, 1) if dist is None else (dist.rank, dist.world_size)
    if rank == 0:
        removed = [name for name in RUN_OUTPUTS if _remove(run_dir / name)]
        removed += [entry.name for entry in run_dir.iterdir() if entry.name.startswith((".tmp-", ".old-"))
                    and _remove(entry)]  # a crashed atomic write of final/
        log.info("--overwrite: removed %s from %s", ", ".join(removed), run_dir)
    if world > 1:
        torch.distributed.barrier()


def _remove(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    else:
        return False
    return True
