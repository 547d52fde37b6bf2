"""Atomic checkpoint directories, trainer state (``weights_only`` loadable) and safetensors files.

Layout under a checkpoint root (``<run_dir>/checkpoints``)::

    step_500/  step_1000/  ...         complete checkpoints, each with a COMPLETE marker
    .tmp-step_1500-<pid>/              a save in progress (or left by a crash: ignored, removed by the next save)

``write_atomic`` lets the caller fill a sibling temp directory, fsyncs every file, writes the ``COMPLETE``
marker last, then renames the directory into place. A crash at any point leaves the previous checkpoints
intact and never a partial ``step_N``. One run directory has one writer (the main rank): a save removes
every leftover temp directory it finds.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from vlp.errors import ConfigError, UserError

__all__ = [
    "COMPLETE_MARKER",
    "write_atomic",
    "save_checkpoint",
    "checkpoint_path",
    "list_checkpoints",
    "latest_checkpoint",
    "resumable_checkpoint",
    "prune_checkpoints",
    "save_trainer_state",
    "load_trainer_state",
    "save_tensors",
    "load_tensors",
]

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-"
_OLD_PREFIX = ".old-"
_ALIASES_KEY = "vlp_aliases"

log = logging.getLogger("vlp")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _remove_leftovers(parent: Path) -> None:
    for entry in parent.iterdir():
        if entry.is_dir() and entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(entry, ignore_errors=True)


def write_atomic(target_dir: Path | str, write: Callable[[Path], None]) -> Path:
    """Create ``target_dir`` atomically: ``write(tmp_dir)`` fills a sibling temp directory, which is
    fsynced, marked ``COMPLETE`` and renamed to ``target_dir``. Returns ``target_dir``.

    If ``write`` raises, the temp directory is removed and the exception propagates; ``target_dir``
    and its siblings are untouched. An existing ``target_dir`` is replaced only after the new one is complete.
    """
    target = Path(target_dir)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent)
    tmp = parent / f"{_TMP_PREFIX}{target.name}-{os.getpid()}"
    tmp.mkdir()
    try:
        write(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        _fsync_tree(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # One line for the user; the checkpoints written before are complete and untouched.
            raise UserError(f"{target}: not saved, no space left on the device ({exc.strerror}); earlier "
                            f"checkpoints in {parent} are intact") from exc
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        # rename() cannot replace a non-empty directory: move the old one aside first.
        old = parent / f"{_OLD_PREFIX}{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_path(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def checkpoint_path(ckpt_root: Path | str, step: int) -> Path:
    """``<ckpt_root>/step_<step>``."""
    return Path(ckpt_root) / f"step_{step}"


def save_checkpoint(ckpt_root: Path | str, step: int, write: Callable[[Path], None],
                    keep_last: int | None = None) -> Path:
    """Write ``<ckpt_root>/step_<step>`` atomically via ``write(dir)``, then keep only the newest ``keep_last``."""
    target = write_atomic(checkpoint_path(ckpt_root, step), write)
    if keep_last is not None:
        prune_checkpoints(ckpt_root, keep_last)
    return target


def list_checkpoints(ckpt_root: Path | str) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_root`` as ``(step, path)``, oldest first; missing root = none."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path | str) -> Path | None:
    """The complete checkpoint with the largest step number, or None."""
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def _unreadable(directory: Path) -> str | None:
    """Why a complete checkpoint cannot be resumed from (a missing, truncated or corrupt weights or trainer
    state file), or None. Headers and archive directories only: the files are read in full by the resume."""
    if not (directory / "trainer_state.pt").is_file() or not (directory / "model.safetensors").is_file():
        return "model.safetensors or trainer_state.pt is missing"
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as err:
            return f"{file.name}: {err}"
    try:
        torch.load(directory / "trainer_state.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # zip and unpickling errors have many types
        return f"trainer_state.pt: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
    return None


def resumable_checkpoint(ckpt_root: Path | str) -> Path | None:
    """The newest complete checkpoint that can be read, or None when there is none; an unreadable newer one
    (a disk error, a file truncated by a copy) is skipped with a warning. Checkpoints that exist but none of
    which can be read are a UserError: starting over would prune them."""
    found = list_checkpoints(ckpt_root)
    problems: list[tuple[Path, str]] = []
    for _, path in reversed(found):
        problem = _unreadable(path)
        if problem is None:
            if problems:
                log.warning("--resume: %s is unreadable (%s); resuming from the previous complete checkpoint %s",
                            problems[0][0], problems[0][1], path)
            return path
        problems.append((path, problem))
    if problems:
        newest_state = problems[0][0] / "trainer_state.pt"
        if newest_state.is_file():
            try:
                load_trainer_state(newest_state)
            except UserError as err:
                if "refused:" in str(err):  # a crafted file: say what it holds, not just that it is unreadable
                    raise

        raise UserError(f"--resume: none of the {len(found)} checkpoints in {ckpt_root} can be read (newest "
                        f"{problems[0][0]}: {problems[0][1]})")
    return None


def prune_checkpoints(ckpt_root: Path | str, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; returns the deleted paths."""
    if keep_last < 1:
        raise ConfigError(f"train.keep_last: must be positive, got {keep_last}")
    found = list_checkpoints(ckpt_root)
    doomed = [path for _, path in found[:-keep_last]]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def save_trainer_state(path: Path | str, state: dict[str, Any]) -> None:
    """``torch.save`` a resume state (optimizer/scheduler state_dicts, step, data position, RNG states).

    Everything in it must be tensors and plain types so that ``load_trainer_state`` can use ``weights_only``.
    """
    torch.save(state, Path(path))


def load_trainer_state(path: Path | str) -> dict[str, Any]:
    """Load a state written by ``save_trainer_state`` onto the CPU with ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: trainer state not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message suggests weights_only=False, which would run the file's code: name the culprit
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise UserError(f"{path}: not a loadable trainer state (corrupt or not a torch.save file)") from err
        raise UserError(f"{path}: refused: it holds a pickled object ({found.group(1)}), not only tensors and plain "
                        "values; vlp never unpickles code, so this file was not written by vlp or was altered") from err
    except Exception as err:  # pickle/zip errors have many types; the message is what matters
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: not a loadable trainer state ({first_line})") from err
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a dict trainer state, got {type(state).__name__}")
    return state


def _storage_key(tensor: Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def _view_key(tensor: Tensor) -> tuple[Any, ...]:
    return (*_storage_key(tensor), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def save_tensors(path: Path | str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to a safetensors file, accepting tied and non-contiguous tensors.

    safetensors refuses tensors that share memory. Names that are the *same* view of one storage (tied
    weights, e.g. an MLM decoder tied to the word embeddings) are stored once and recorded as aliases in the
    file's metadata; ``load_tensors`` maps them back to one shared tensor. Other tensors that overlap a
    storage used elsewhere (different slices of one buffer) are written as independent contiguous copies.
    """
    canonical: dict[tuple[Any, ...], str] = {}
    storages: set[tuple[str, int]] = set()
    aliases: dict[str, str] = {}
    payload: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        view = _view_key(tensor)
        if view in canonical:
            aliases[name] = canonical[view]
            continue
        canonical[view] = name
        shared = _storage_key(tensor) in storages and tensor.numel() > 0
        storages.add(_storage_key(tensor))
        payload[name] = tensor.clone().contiguous() if shared or not tensor.is_contiguous() else tensor
    header = dict(metadata or {})
    if aliases:
        header[_ALIASES_KEY] = json.dumps(aliases)
    save_file({k: v.cpu() for k, v in payload.items()}, str(path), metadata=header or None)


def load_tensors(path: Path | str, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a safetensors file written by ``save_tensors`` (or any safetensors file), restoring aliases."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tensor file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from err
    for alias, target in json.loads(metadata.get(_ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[target]
    return tensors
