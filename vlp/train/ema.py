"""An exponential moving average of the model weights (``train.ema_decay``), with timm ``ModelEmaV3``'s rule.

After optimizer step ``step`` (counted from 1) the average moves towards the online weights::

    ema <- decay_t * ema + (1 - decay_t) * online        (torch.lerp(ema, online, 1 - decay_t))

    t = step - start_step - 1;  decay_t = 0 for t <= 0 (the average is a copy of the weights), else
    decay_t = decay, or with warm-up max(min_decay, min(decay, 1 - (1 + t / gamma) ** -power))

as ``timm.utils.ModelEmaV3.get_decay(step)``; ``every`` > 1 updates only after every N-th step (the decay
is per update, not per step). Floating-point buffers (e.g. BatchNorm statistics) are averaged too, other
buffers are copied. This is not the momentum encoder (``objective.momentum``), which is part of ALBEF's
objective and feeds its targets: the EMA never changes training, it is a second set of weights that is
evaluated and saved beside the online ones.

The average is kept as tensors beside the trainable parameters, not as a second module: evaluating or saving
it swaps its values into the online module and back (``swapped_into``), so every writer and evaluator of the
run works unchanged. Under FSDP the tensors are the ranks' shards (DTensors) and the swap is local; the
checkpoint file holds full tensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from vlp.collectives import is_main
from vlp.config.schema import Config, TrainConfig

__all__ = ["ema_decay_at", "WeightEMA", "build_ema", "restore_ema", "evaluate", "EMA_FILE"]

log = logging.getLogger("vlp")

EMA_FILE = "ema.safetensors"


def ema_decay_at(step: int, decay: float, start_step: int = 0, warmup: bool = False, gamma: float = 1.0,
                 power: float = 2 / 3, min_decay: float = 0.0) -> float:
    """The decay of the update after optimizer step ``step`` (timm ``ModelEmaV3.get_decay``)."""
    t = max(0, step - start_step - 1)
    if t <= 0:
        return 0.0
    if warmup:
        return max(min(1.0 - (1.0 + t / gamma) ** -power, decay), min_decay)
    return decay


def _local(tensor: Tensor) -> Tensor:
    to_local = getattr(tensor, "to_local", None)  # an FSDP2 DTensor: this rank's shard
    return to_local() if callable(to_local) else tensor


class WeightEMA:
    """The moving average of ``module``'s trainable parameters and buffers, keyed by their state-dict names.

    Frozen parameters are left out (their average is themselves) and a tied parameter is kept once.
    """

    def __init__(self, module: nn.Module, decay: float, every: int = 1, start_step: int = 0,
                 warmup: bool = False, gamma: float = 1.0, power: float = 2 / 3, min_decay: float = 0.0) -> None:
        self.decay, self.every, self.start_step = decay, every, start_step
        self.warmup, self.gamma, self.power, self.min_decay = warmup, gamma, power, min_decay
        self.targets: dict[str, Tensor] = {}
        seen: set[int] = set()
        for name, tensor in module.state_dict(keep_vars=True).items():
            frozen = isinstance(tensor, nn.Parameter) and not tensor.requires_grad
            if frozen or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            self.targets[name] = tensor
        with torch.no_grad():
            self.shadow = {name: tensor.detach().clone() for name, tensor in self.targets.items()}
        self.last_decay = 0.0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move towards the online values after optimizer step ``step`` (1-based), if it is an update step."""
        if not self.due(step):
            return
        decay = ema_decay_at(step, self.decay, self.start_step, self.warmup, self.gamma, self.power,
                             self.min_decay)
        self.last_decay = decay
        floats, online = [], []
        for name, target in self.targets.items():
            shadow, value = _local(self.shadow[name]), _local(target.detach())
            if shadow.is_floating_point():
                floats.append(shadow)
                online.append(value)
            else:
                shadow.copy_(value)
        if floats:
            torch._foreach_lerp_(floats, online, 1.0 - decay)

    @contextmanager
    def swapped_into(self) -> Iterator[None]:
        """Inside the block the module holds the averaged values; afterwards its own, bit for bit."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for name, target in self.targets.items():
            online, shadow = _local(target.detach()), _local(self.shadow[name])
            held = online.clone()
            online.copy_(shadow)
            shadow.copy_(held)

    def state_dict(self) -> dict[str, Tensor]:
        """Full CPU tensors (a collective under FSDP: every rank calls it)."""
        out = {}
        for name, tensor in self.shadow.items():
            full = getattr(tensor, "full_tensor", None)
            out[name] = (full() if callable(full) else tensor).detach().cpu()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> list[str]:
        """Load the saved averages; returns the names not in ``state`` (they keep the online values)."""
        missing = []
        for name, shadow in self.shadow.items():
            if name not in state or state[name].shape != shadow.shape:
                missing.append(name)
                continue
            value = state[name]
            if hasattr(shadow, "device_mesh"):  # this rank's part of a full tensor
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(_local(shadow).device), shadow.device_mesh,
                                          shadow.placements)  # type: ignore[attr-defined]
            _local(shadow).copy_(_local(value))
        return missing

    def save(self, directory: Path, state: dict[str, Tensor] | None = None) -> None:
        from vlp.train.checkpoint import save_tensors

        save_tensors(directory / EMA_FILE, self.state_dict() if state is None else state)


def build_ema(cfg: TrainConfig, module: nn.Module) -> WeightEMA | None:
    """The run's EMA from the train section, or None when ``train.ema_decay`` is 0."""
    if cfg.ema_decay <= 0:
        return None
    return WeightEMA(module, cfg.ema_decay, every=cfg.ema_every, start_step=cfg.ema_start_step,
                     warmup=cfg.ema_warmup, gamma=cfg.ema_warmup_gamma, power=cfg.ema_warmup_power,
                     min_decay=cfg.ema_min_decay)


def restore_ema(ema: WeightEMA, directory: Path) -> None:
    """The averages saved in a checkpoint; one saved without them (the EMA switched on at the resume) starts
    from the checkpoint's weights, with a warning."""
    from vlp.train.checkpoint import load_tensors

    path = directory / EMA_FILE
    if not path.is_file():
        log.warning("%s: no weight EMA in this checkpoint; the EMA starts from its weights", directory)
        return
    missing = ema.load_state_dict(load_tensors(path))
    if missing:
        log.warning("%s: %d EMA tensors not in the checkpoint (e.g. %s) start from the weights", path,
                    len(missing), missing[0])


def evaluate(run_eval: Callable[[int, bool], dict[str, float]] | None, ema: WeightEMA | None, config: Config,
             run_dir: Path, step: int, final: bool) -> dict[str, float]:
    """The run's evaluation of the weights ``eval.weights`` names: online metrics as ``eval/...``, the EMA's
    as ``eval_ema/...``. After training the EMA's are also written to ``eval_ema.json`` and the files its
    evaluation writes carry an ``_ema`` suffix (``eval_retrieval_ema.json``, ``plots/recall_at_k_ema.png``)."""
    if run_eval is None:
        return {}
    which = config.eval.weights if ema is not None else "online"
    results: dict[str, float] = {}
    if ema is not None and which in ("ema", "both"):
        before = _result_files(run_dir) if final else {}
        with ema.swapped_into():
            averaged = run_eval(step, final)
        averaged = {key.replace("eval/", "eval_ema/", 1): value for key, value in averaged.items()}
        results.update(averaged)
        if final and is_main():
            _mark_as_ema(run_dir, before)  # the online evaluation below writes the plain names
            (run_dir / "eval_ema.json").write_text(json.dumps(averaged, indent=2))
    if which in ("online", "both"):
        results.update(run_eval(step, final))
    return results


_NOT_RESULTS = ("checkpoints", "final", "final_ema", "metrics.jsonl", "config.yaml", "tensorboard")


def _result_files(run_dir: Path) -> dict[Path, int]:
    """The files a final evaluation may write (eval_*.json, predictions, plots), with their mtimes."""
    if not run_dir.is_dir():
        return {}
    return {path: path.stat().st_mtime_ns for path in run_dir.rglob("*")
            if path.is_file() and path.relative_to(run_dir).parts[0] not in _NOT_RESULTS}


def _mark_as_ema(run_dir: Path, before: dict[Path, int]) -> None:
    """Files the EMA's final evaluation wrote get an ``_ema`` suffix (eval_retrieval_ema.json, ...)."""
    for path, mtime in _result_files(run_dir).items():
        if before.get(path) != mtime:
            path.replace(path.with_name(f"{path.stem}_ema{path.suffix}"))
