"""YAML <-> frozen dataclasses: strict keys with suggestions, type checks, ``--set`` overrides.

Nothing in a config is ever evaluated as code: values are parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vlp.config.schema import Config
from vlp.errors import ConfigError

__all__ = ["from_dict", "to_dict", "load_config", "save_config", "apply_overrides", "suggest_key"]

T = TypeVar("T")


def suggest_key(key: str, valid: list[str]) -> str | None:
    """Closest valid key: a valid key made of the typo's leading segments (``lr_rate`` -> ``lr``), then
    difflib, then shared underscore segments or prefix."""
    parts = key.lower().split("_")
    for n in range(len(parts) - 1, 0, -1):
        head = "_".join(parts[:n])
        if head in valid:
            return head
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    segments = set(key.lower().split("_"))
    scored = []
    for name in valid:
        shared = len(segments & set(name.lower().split("_")))
        prefix = len(_common_prefix(key.lower(), name.lower()))
        if shared or prefix >= 2:
            scored.append((shared, prefix, -abs(len(name) - len(key)), name))
    return max(scored)[3] if scored else None


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key)  # type: ignore[arg-type]
    if origin in (types.UnionType, typing.Union):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key '{key}' expects null, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list of {typing.get_args(tp)[0].__name__}, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' expects float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects str, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build a (nested) frozen dataclass from a plain dict; unknown keys fail with a suggestion."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = suggest_key(str(key), list(fields))
            where = f"{prefix}.{hint}" if prefix else hint
            extra = f"; did you mean '{where}'?" if hint else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key '{full}'{extra}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML-safe types (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key.sub=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str], cls: type = Config) -> dict[str, Any]:
    """Apply ``a.b=c`` overrides to a raw dict, checking every key against the dataclass tree."""
    for item in overrides:
        path, value = _parse_override(item)
        node, node_cls = data, cls
        for depth, part in enumerate(path):
            fields = {f.name: f for f in dataclasses.fields(node_cls)}
            prefix = ".".join(path[:depth])
            if part not in fields:
                hint = suggest_key(part, list(fields))
                where = f"{prefix}.{hint}" if prefix else hint
                extra = f"; did you mean '{where}'?" if hint else ""
                raise ConfigError(f"unknown config key '{'.'.join(path)}'{extra}")
            field_type = typing.get_type_hints(node_cls)[part]
            if depth == len(path) - 1:
                node[part] = value
            else:
                if not dataclasses.is_dataclass(field_type):
                    node[part] = {**(node.get(part) or {}), ".".join(path[depth + 1 :]): value}
                    break
                if not isinstance(node.get(part), dict):  # absent or null section: create it in place
                    node[part] = {}
                node = node[part]
                node_cls = field_type  # type: ignore[assignment]
    return data


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last one,
    so a second ``optim:`` section would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                first = "" if seen[key] == line else f" (first at line {seen[key]})"
                raise _DuplicateKey(f"duplicate key '{key}' at line {line}{first}")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(yaml.YAMLError):
    pass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a YAML mapping")
    return data


def load_config(source: str | Path | dict[str, Any] | Config, overrides: list[str] | None = None,
                model: dict[str, Any] | None = None) -> Config:
    """Load a run config from a YAML path or dict, apply ``--set`` overrides, validate keys and types.

    A ``model:`` value that is a string names a model preset file (relative to the config file,
    or to ``configs/models/``). ``model`` replaces the model section (fine-tuning takes it from the
    checkpoint being fine-tuned).
    """
    if isinstance(source, Config):
        data: dict[str, Any] = to_dict(source)
        base = Path.cwd()
    elif isinstance(source, dict):
        data, base = dict(source), Path.cwd()
    else:
        path = Path(source)
        data, base = _read_yaml(path), path.parent
        data.setdefault("name", path.stem)
    if model is not None:
        data["model"] = model
    if isinstance(data.get("model"), str):
        data["model"] = load_model_dict(data["model"], base)
    data = apply_overrides(data, overrides or [])
    config = _objective_follows_model(from_dict(Config, data), data.get("objective"))
    from vlp.config.validate import validate_config

    validate_config(config)
    return config


def _objective_follows_model(config: Config, given: Any) -> Config:
    """Objective weights the config does not set follow the model: no ITM term (itm_weight 0) for a model
    without fusion or without an ITM head, so a minimal dual-encoder config needs no objective section."""
    given = given if isinstance(given, dict) else {}
    can_match = config.model.fusion.type != "none" and config.model.itm_head
    if "itm_weight" in given or can_match:
        return config
    return dataclasses.replace(config, objective=dataclasses.replace(config.objective, itm_weight=0.0))


def load_model_dict(ref: str, base: Path) -> dict[str, Any]:
    """A model preset by path or by name (``albef_base`` -> configs/models/albef_base.yaml)."""
    candidates = [base / ref, Path(ref), Path(__file__).resolve().parents[2] / "configs" / "models" / f"{ref}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            data = _read_yaml(candidate)
            return dict(data.get("model", data))
    raise ConfigError(f"model preset not found: {ref}")


def save_config(config: Any, path: str | Path, extra: dict[str, Any] | None = None) -> None:
    data = to_dict(config)
    if extra:
        data = {**extra, **data}
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
