"""What the training loop does when something goes wrong: a stop signal, unreadable data, a non-finite loss
or gradient, a dead data loader worker. docs/reliability.md states the guarantees and the messages.

The loop (vlp/train/loop.py) calls these at fixed points of a step; the counters live in
``TrainState`` (vlp/train/state.py) so that they are saved with every checkpoint and survive ``--resume``. ``TrainingStopped``
is also importable from vlp.train.loop, where it lived first.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlp.config.schema import Config
from vlp.errors import UserError
from vlp.train import checkpoint as ckpt
from vlp.train.distributed import DistInfo
from vlp.train.state import TrainState

__all__ = ["TrainingStopped"]  # the rest are the loop's hooks

log = logging.getLogger("vlp")

_MAX_LOGGED_BAD = 10_000  # distinct bad paths logged per run (memory stays bounded on huge broken datasets)


class TrainingStopped(UserError):
    """The run stopped on request (SIGTERM/SIGINT) or because a data worker died; ``exit_code`` is what
    the CLI exits with (128 + signal number, as a shell reports a killed process; 1 for a dead worker)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StopFlag:
    """SIGTERM/SIGINT ask the loop to save a checkpoint and exit at the next step boundary; a second signal
    stops at once (KeyboardInterrupt: a checkpoint write it interrupts leaves the previous ones intact)."""

    def __init__(self) -> None:
        self.requested = False
        self.signum = int(signal.SIGTERM)  # what another rank's stop is reported as
        self._previous: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        log.warning("%s: saving a checkpoint after this step, then stopping (send it again to stop at once)",
                    signal.Signals(signum).name)

    def stopped(self, step: int, saved: Path) -> TrainingStopped:
        """The error that ends the run once the checkpoint of ``step`` is written."""
        return TrainingStopped(f"stopped by {signal.Signals(self.signum).name} at step {step}; "
                               f"checkpoint saved at {saved} (continue with --resume)", 128 + self.signum)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def any_rank(dist: DistInfo, flag: bool) -> bool:
    """True when the flag is raised on any rank: a signal can reach the ranks at different steps, a loss be
    NaN on one only, and every rank must take the same branch (or the next collective hangs)."""
    if dist.world_size == 1:
        return flag
    tensor = torch.tensor([float(flag)], device=dist.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor.item())


def step_is_finite(state: TrainState, grad_norm: Tensor) -> bool:
    """False for a non-finite loss (``state.loss_finite``) or gradient norm: the step is skipped and counted
    (``check_nonfinite`` stops the run after train.max_nonfinite_steps in a row)."""
    if not (state.loss_finite and torch.isfinite(grad_norm)):
        state.nonfinite_in_row += 1
        state.nonfinite_total += 1
        log.warning("step %d: non-finite %s, step skipped (%d in a row)", state.step + 1,
                    "gradient" if state.loss_finite else "loss", state.nonfinite_in_row)
        return False
    state.nonfinite_in_row = 0
    return True


def check_nonfinite(config: Config, state: TrainState, ckpt_root: Path) -> None:
    """Stop after train.max_nonfinite_steps skipped steps in a row, naming the checkpoint to go back to."""
    if state.nonfinite_in_row < config.train.max_nonfinite_steps:
        return
    latest = ckpt.latest_checkpoint(ckpt_root)
    where = f"the last good checkpoint is {latest}" if latest is not None else "no checkpoint was written yet"
    raise UserError(f"{state.nonfinite_in_row} non-finite steps in a row (loss or gradient) at step {state.step + 1}; "
                    f"{where} (lower optim.lr or raise schedule.warmup_steps, then --resume)")


def note_data(batch: dict[str, Any], state: TrainState) -> None:
    """Count the collator's reports; log each bad path once per run and keep a few for the error message."""
    state.bad_samples += int(batch.get("bad", 0))
    state.good_samples += len(batch["images"])
    state.truncated_captions += int(batch.get("truncated", 0))
    state.unk_tokens += int(batch.get("unk_tokens", 0))
    state.word_tokens += int(batch.get("word_tokens", 0))
    for path, reason in zip(batch.get("bad_paths", ()), batch.get("bad_reasons", ())):
        if len(state.bad_examples) < 3 and path not in state.bad_examples:
            state.bad_examples.append(path)
        if path in state.logged_bad or len(state.logged_bad) >= _MAX_LOGGED_BAD:
            continue
        state.logged_bad.add(path)
        log.warning("skipping sample %s: %s", path, reason)
        if len(state.logged_bad) == _MAX_LOGGED_BAD:
            log.warning("%d bad paths logged; further ones are only counted (bad_samples in metrics.jsonl)",
                        _MAX_LOGGED_BAD)


def data_counts(state: TrainState, dist: DistInfo) -> dict[str, float]:
    """Data-fault counts of all ranks (each reads its own shard) for metrics.jsonl."""
    counts = [state.bad_samples, state.good_samples, state.truncated_captions, state.unk_tokens, state.word_tokens]
    if dist.world_size > 1:
        tensor = torch.tensor(counts, dtype=torch.int64, device=dist.device)
        torch.distributed.all_reduce(tensor)
        counts = [int(value) for value in tensor.tolist()]
    bad, good, truncated, unknown, words = counts
    record = {"bad_samples": bad, "bad_fraction": bad / max(bad + good, 1), "truncated_captions": truncated}
    if words:  # VQA questions are not counted
        record["unk_fraction"] = unknown / words
    return record


def check_vocabulary(config: Config, finetuning: bool) -> None:
    """Own captions with the synthetic tokenizer would train on [UNK]s: refuse the pair before any work."""
    import vlp.data.datasets  # noqa: F401  (registers the sources)
    from vlp.registry import datasets

    d, text = config.data, config.model.text
    if d.source == "synthetic" or text.tokenizer != "synthetic" or d.source not in datasets:
        return  # an unknown source is reported, with a suggestion, where the dataset is built
    fix = ("fine-tune a checkpoint pretrained with model.text.tokenizer" if finetuning
           else "set model.text.tokenizer")
    raise UserError(f"data.source is '{d.source}' but model.text.tokenizer is 'synthetic', the word list of the "
                    "built-in synthetic dataset: other words would become [UNK]; "
                    f"{fix} to 'clip' (open_clip's bundled BPE) or a local tokenizer path (a tokenizer.json or "
                    "a Hugging Face tokenizer directory)")


_UNK_WARN = 0.01  # above this the run warns once; above data.max_unk_fraction it stops


def check_unknown_tokens(config: Config, state: TrainState, dist: DistInfo) -> None:
    """After the first step and at every log step (all ranks, the same steps): warn once when more than 1% of
    the caption tokens are unknown to the tokenizer, stop above data.max_unk_fraction."""
    if not (state.step == 1 or state.step % config.train.log_every == 0):
        return
    fraction = data_counts(state, dist).get("unk_fraction", 0.0)
    if fraction <= _UNK_WARN:
        return
    text = config.model.text
    name = text.tokenizer or text.name
    what = (f"{fraction:.1%} of the caption tokens ({state.unk_tokens} of {state.word_tokens} on this process) "
            f"are unknown to the tokenizer '{name}'")
    if fraction > config.data.max_unk_fraction:
        raise UserError(f"{what}, above data.max_unk_fraction={config.data.max_unk_fraction}: the model would not "
                        "see those words; use a tokenizer that covers the captions (model.text.tokenizer: 'clip' "
                        "or a local tokenizer path)")
    if not state.unk_warned:
        state.unk_warned = True
        log.warning("%s (unk_fraction in metrics.jsonl; the run stops above data.max_unk_fraction=%g)", what,
                    config.data.max_unk_fraction)


def check_bad_data(config: Config, state: TrainState) -> None:
    """Stop when more than data.max_bad_fraction of the samples read so far were unusable (once 200 were read)."""
    read = state.good_samples + state.bad_samples
    if read >= 200 and state.bad_samples > config.data.max_bad_fraction * read:
        raise UserError(f"{state.bad_samples} of {read} samples ({state.bad_samples / read:.1%}) were unreadable, "
                        f"above data.max_bad_fraction={config.data.max_bad_fraction}; e.g. "
                        f"{', '.join(state.bad_examples) or '(paths not reported by this data source)'}")


def check_epoch(produced: bool, readable: bool, state: TrainState) -> None:
    """After a whole epoch read from its start: it gave a batch, and a batch with a readable sample."""
    if not produced:
        raise UserError("the training data produced no batch (empty data or batch_size too large)")
    if not readable:  # else an all-bad dataset with max_bad_fraction 1 would loop forever
        raise UserError(f"no readable sample in a whole epoch of the training data; examples: "
                        f"{', '.join(state.bad_examples) or 'none recorded'}")


def worker_death(error: RuntimeError, step: int) -> TrainingStopped | None:
    """The stop for a data loader worker that died (torch's SIGCHLD handler raises a RuntimeError wherever the
    main process happens to be) or gave no batch within ``data.worker_timeout``; None for any other
    RuntimeError."""
    if "DataLoader timed out" in str(error):
        return TrainingStopped(f"no batch from the data loader workers at step {step + 1} within data.worker_timeout "
                               f"({' '.join(str(error).split())}); a worker is stuck reading data (a stalled "
                               "file system or remote store?): fix it, then continue with --resume", exit_code=1)
    if "DataLoader worker" not in str(error):
        return None
    return TrainingStopped(f"a data loader worker died at step {step + 1} ({' '.join(str(error).split())}); "
                           "workers are usually killed for memory: lower data.num_workers or data.batch_size, "
                           "then continue with --resume", exit_code=1)


def fault_state(state: TrainState) -> dict[str, Any]:
    """The fault counters a checkpoint's trainer_state.pt keeps (the run's totals go on after --resume)."""
    return {"nonfinite_total": state.nonfinite_total, "bad_samples": state.bad_samples,
            "good_samples": state.good_samples, "truncated_captions": state.truncated_captions,
            "unk_tokens": state.unk_tokens, "word_tokens": state.word_tokens,
            "bad_examples": list(state.bad_examples)}


def restore_fault_state(state: TrainState, trainer: dict[str, Any]) -> None:
    """``fault_state``'s counters back; checkpoints written before a counter existed start it at zero
    (good_samples: at the samples seen, so restore ``state.samples_seen`` first)."""
    state.nonfinite_total = int(trainer.get("nonfinite_total", 0))
    state.bad_samples = int(trainer.get("bad_samples", 0))
    state.good_samples = int(trainer.get("good_samples", state.samples_seen))
    state.truncated_captions = int(trainer.get("truncated_captions", 0))
    state.unk_tokens = int(trainer.get("unk_tokens", 0))
    state.word_tokens = int(trainer.get("word_tokens", 0))
    state.bad_examples = [str(path) for path in trainer.get("bad_examples", [])]
