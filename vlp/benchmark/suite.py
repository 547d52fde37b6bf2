"""Benchmark suites: a YAML file of named tasks, each a frozen dataclass chosen by its ``type``.

A suite is ``{name, defaults, tasks: {task name: {type, ...}}}``. ``defaults`` holds the settings every task
shares (batch size, precision, data workers); a task may override them. Paths are strings; the shipped suites
leave them as the placeholder ``???``, which the user replaces with ``--set tasks.NAME.KEY=PATH``. A task whose
path is still a placeholder fails on its own when it runs: the other tasks are unaffected.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.config.io import _parse_override, _read_yaml, from_dict, suggest_key
from vlp.errors import ConfigError, UserError
from vlp.precision import DEFAULT_PRECISION, PRECISIONS

__all__ = ["PLACEHOLDER", "TASK_TYPES", "Suite", "TaskSpec", "load_suite", "required_path"]

PLACEHOLDER = "???"
SHARED_KEYS = ("batch_size", "precision", "num_workers")


@dataclass(frozen=True)
class TaskSpec:
    """Settings every task has."""

    type: str
    batch_size: int = 128
    precision: str = DEFAULT_PRECISION
    num_workers: int = 0


@dataclass(frozen=True)
class RetrievalTask(TaskSpec):
    format: str = "karpathy"  # karpathy: annotation JSON + image_root; wds: CLIP_benchmark webdataset dir
    data: str = PLACEHOLDER
    image_root: str = ""
    split: str = "test"
    k_test: int = 128
    scores: tuple[str, ...] = ("itm", "itm+itc", "itm+itc_logit")


@dataclass(frozen=True)
class ZeroShotTask(TaskSpec):
    format: str = "imagefolder"  # imagefolder: class subfolders; wds: CLIP_benchmark webdataset dir
    data: str = PLACEHOLDER
    split: str = "test"
    classnames: str = ""  # a .txt/.json file, or imagenet1k (open_clip's class names)
    templates: str = ""  # a .txt/.json file, or imagenet1k / imagenet1k_simple (open_clip's templates)
    itm_k: int = 5
    scores: tuple[str, ...] = ("itm", "itm+itc_logit")  # re-scoring rules of a fused model (RERANK_SCORES)


@dataclass(frozen=True)
class LinearProbeTask(TaskSpec):
    train: str = PLACEHOLDER
    test: str = PLACEHOLDER
    val: str = ""
    val_proportion: float = 0.2
    lr: float = 0.1
    epochs: int = 10
    probe_batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class SugarCrepeTask(TaskSpec):
    data: str = PLACEHOLDER  # the directory of the category files (add_att.json, swap_obj.json, ...)
    image_root: str = PLACEHOLDER  # COCO val2017 images
    categories: tuple[str, ...] = ()  # default: every *.json in data


@dataclass(frozen=True)
class WinogroundTask(TaskSpec):
    data: str = PLACEHOLDER  # holds examples.jsonl and images/


@dataclass(frozen=True)
class VGTask(TaskSpec):
    data: str = PLACEHOLDER  # visual_genome_relation.json / visual_genome_attribution.json
    image_root: str = PLACEHOLDER
    min_count: int = -1  # groups with fewer cases leave the macro average; -1: ARO's (1 relation, 25 attribution)
    exclude: str = ""  # a .txt/.json file of relation or attribute-pair names left out of the macro average


@dataclass(frozen=True)
class OrderTask(TaskSpec):
    data: str = PLACEHOLDER  # [{"image", "caption_options": [true caption, perturbed, ...]}]
    image_root: str = PLACEHOLDER


TASK_TYPES: dict[str, type[TaskSpec]] = {
    "retrieval": RetrievalTask, "zeroshot": ZeroShotTask, "linear_probe": LinearProbeTask,
    "sugarcrepe": SugarCrepeTask, "winoground": WinogroundTask, "vg_relation": VGTask,
    "vg_attribution": VGTask, "order": OrderTask,
}
_CHOICES: dict[str, tuple[str, ...]] = {"precision": PRECISIONS}
_FORMATS = {RetrievalTask: ("karpathy", "wds"), ZeroShotTask: ("imagefolder", "wds")}


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: dict[str, TaskSpec]
    source: str = ""


def _task(name: str, raw: Any, defaults: dict[str, Any], where: str) -> TaskSpec:
    prefix = f"tasks.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: '{prefix}' must be a mapping with a 'type'")
    kind = raw.get("type")
    if kind not in TASK_TYPES:
        hint = suggest_key(str(kind), list(TASK_TYPES)) if kind else None
        extra = f"; did you mean '{hint}'?" if hint else f"; known: {', '.join(TASK_TYPES)}"
        raise ConfigError(f"{where}: '{prefix}.type' is {kind!r}{extra}")
    cls = TASK_TYPES[kind]
    try:
        spec = from_dict(cls, {**defaults, **raw}, prefix=prefix)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    for key, choices in _CHOICES.items():
        if getattr(spec, key) not in choices:
            raise ConfigError(f"{where}: '{prefix}.{key}' is {getattr(spec, key)!r}; one of {', '.join(choices)}")
    formats = _FORMATS.get(cls)
    fmt = getattr(spec, "format", "")
    if formats and fmt not in formats:
        raise ConfigError(f"{where}: '{prefix}.format' is {fmt!r}; one of {', '.join(formats)}")
    if spec.batch_size <= 0 or spec.num_workers < 0:
        raise ConfigError(f"{where}: '{prefix}' needs batch_size > 0 and num_workers >= 0")
    return spec


def _apply_sets(data: dict[str, Any], overrides: list[str], where: str) -> None:
    """``--set name=...``, ``--set defaults.KEY=...`` or ``--set tasks.TASK.KEY=...`` on the raw suite."""
    tasks = data.get("tasks") or {}
    for item in overrides:
        path, value = _parse_override(item)
        head = path[0]
        if head == "name" and len(path) == 1:
            data["name"] = value
        elif head == "defaults" and len(path) == 2:
            if path[1] not in SHARED_KEYS:
                hint = suggest_key(path[1], list(SHARED_KEYS))
                raise ConfigError(f"--set: unknown key 'defaults.{path[1]}'"
                                  + (f"; did you mean 'defaults.{hint}'?" if hint else ""))
            data.setdefault("defaults", {})[path[1]] = value
        elif head == "tasks" and len(path) == 3:
            if path[1] not in tasks:
                hint = suggest_key(path[1], list(tasks))
                extra = f"; did you mean 'tasks.{hint}'?" if hint else f"; the suite has {', '.join(tasks)}"
                raise ConfigError(f"--set: {where} has no task '{path[1]}'{extra}")
            tasks[path[1]][path[2]] = value  # the key is checked when the task is built
        else:
            raise ConfigError(f"--set: '{'.'.join(path)}' is not name, defaults.KEY or tasks.TASK.KEY")


def load_suite(path: str | Path, overrides: list[str] | None = None) -> Suite:
    """Read a suite file, apply ``--set`` overrides and check every key (did-you-mean on a typo)."""
    path = Path(path)
    data = _read_yaml(path)
    unknown = sorted(set(data) - {"name", "defaults", "tasks"})
    if unknown:
        hint = suggest_key(unknown[0], ["name", "defaults", "tasks"])
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'" + (f"; did you mean '{hint}'?" if hint else ""))
    if not isinstance(data.get("tasks"), dict) or not data["tasks"]:
        raise ConfigError(f"{path}: 'tasks' must be a non-empty mapping of task name -> task")
    data["tasks"] = {str(k): dict(v) if isinstance(v, dict) else v for k, v in data["tasks"].items()}
    _apply_sets(data, list(overrides or []), str(path))
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - set(SHARED_KEYS):
        extra = sorted(set(defaults) - set(SHARED_KEYS)) if isinstance(defaults, dict) else defaults
        raise ConfigError(f"{path}: 'defaults' takes only {', '.join(SHARED_KEYS)}; got {extra}")
    tasks = {name: _task(name, raw, defaults, str(path)) for name, raw in data["tasks"].items()}
    return Suite(name=str(data.get("name") or path.stem), tasks=tasks, source=str(path))


def required_path(task_name: str, spec: TaskSpec, key: str, kind: str = "path") -> Path:
    """A path setting of a task, checked to be set and to exist; else one UserError line naming both."""
    value = str(getattr(spec, key))
    if value in ("", PLACEHOLDER):
        raise UserError(f"tasks.{task_name}.{key} is not set: pass --set tasks.{task_name}.{key}=PATH")
    path = Path(value).expanduser()
    checks = {"file": Path.is_file, "directory": Path.is_dir, "path": Path.exists}
    if not checks[kind](path):
        raise UserError(f"tasks.{task_name}.{key}: {'' if kind == 'path' else kind + ' '}not found: {value}")
    return path


def spec_dict(spec: TaskSpec) -> dict[str, Any]:
    """The task's settings as plain values (for the results file)."""
    hints = typing.get_type_hints(type(spec))
    return {f.name: (list(v) if isinstance(v := getattr(spec, f.name), tuple) else v)
            for f in dataclasses.fields(spec) if f.name in hints}
