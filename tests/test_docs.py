"""The documentation stays true to the code: the generated configs reference, config keys, CLI lines,
links, and the Python snippets of docs/fusion.md and docs/design.md."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import vlp.config.schema as schema
from vlp.config import Config, apply_overrides, from_dict
from vlp.config.docs import config_sections, render_config_docs, undocumented_fields
from vlp.config.schema import doc, section
from vlp.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REGENERATE = "python -m vlp.config.docs > docs/configs.md"
SECTIONS = sorted({path.split(".")[0] for path, _, _ in config_sections(Config) if path})
FILE_SUFFIXES = {"safetensors", "py", "pt", "yaml", "json", "jsonl", "png", "md", "html", "txt", "tar"}
# keys the docs show on purpose as mistakes (the error message for a typo)
DELIBERATE_TYPOS = {"optim.lr_rate", "data.batchsize"}
# commands whose pages other engineers write; their lines are checked once the command is registered
PENDING_COMMANDS = {"explain", "report"}


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_configs_reference_is_generated_from_the_dataclasses() -> None:
    written = (DOCS / "configs.md").read_text()
    assert written == render_config_docs(), f"docs/configs.md is stale: run `{REGENERATE}`"


def test_regenerate_command_prints_the_reference() -> None:
    result = subprocess.run([sys.executable, "-m", "vlp.config.docs"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, check=True)
    assert result.stdout == render_config_docs()


def test_every_config_field_is_documented() -> None:
    assert undocumented_fields(Config) == [], "give these fields a doc: schema.doc(default, 'meaning')"


def test_every_schema_dataclass_is_part_of_the_config() -> None:
    # a config class defined but not reachable from Config would escape the reference and the check above
    reachable = {cls for _, cls, _ in config_sections(Config)}
    defined = {obj for _, obj in inspect.getmembers(schema, inspect.isclass)
               if dataclasses.is_dataclass(obj) and obj.__module__ == schema.__name__}
    assert defined == reachable


@dataclasses.dataclass(frozen=True)
class _Inner:
    documented: int = doc(1, "Has a doc.")
    bare: int = 2
    blank: str = dataclasses.field(default="", metadata={"doc": "   "})


@dataclasses.dataclass(frozen=True)
class _Outer:
    name: str = doc("x", "Has a doc.")
    inner: _Inner = section(_Inner, "A nested section.")
    undocumented_section: _Inner = dataclasses.field(default_factory=_Inner)


def test_undocumented_fields_are_detected_at_any_depth() -> None:
    assert undocumented_fields(_Outer) == [
        "inner.bare", "inner.blank", "undocumented_section",
        "undocumented_section.bare", "undocumented_section.blank",
    ]
    with pytest.raises(ValueError, match="inner.bare"):
        render_config_docs(_Outer)


def _reference_tables(text: str) -> dict[str, dict[str, tuple[str, str]]]:
    """{section path: {key: (type, default cell)}} parsed from the generated Markdown."""
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"^## (?:`([\w.]+)`|Top level)$", line)
        if heading:
            current = heading.group(1) or ""
            tables[current] = {}
            continue
        row = re.match(r"^\| `(\w+)` \| ([^|]*) \| (.*?) \| .* \|$", line)
        if row and current is not None:
            tables[current][row.group(1)] = (row.group(2).strip(), row.group(3).strip())
    return tables


def _leaf_keys(cls: type) -> set[str]:
    """Every dotted key that holds a value (not a section)."""
    sections = config_sections(cls)
    paths = {path for path, _, _ in sections}
    keys = {f"{path}.{field.name}" if path else field.name
            for path, section_cls, _ in sections for field in dataclasses.fields(section_cls)}
    return keys - paths


def test_reference_lists_every_key_and_its_defaults_load_back() -> None:
    tables = _reference_tables((DOCS / "configs.md").read_text())
    documented: set[str] = set()
    data: dict[str, Any] = {}
    for path, rows in tables.items():
        for key, (type_name, default) in rows.items():
            if type_name == "section":
                continue
            documented.add(f"{path}.{key}" if path else key)
            node = data
            for part in [p for p in path.split(".") if p]:
                node = node.setdefault(part, {})
            node[key] = yaml.safe_load(default.strip("`").replace("\\|", "|"))
    assert documented == _leaf_keys(Config)
    # the defaults as written in the reference are valid YAML that rebuilds the real defaults
    assert from_dict(Config, data) == Config()


def _doc_code_blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), re.S)


def _resolves(key: str) -> bool:
    try:
        apply_overrides({}, [f"{key}=0"])
    except UserError:
        return False
    return True


def test_config_keys_named_in_the_docs_exist() -> None:
    # `section.key` in backticks or --set section.key=...; file names such as `model.safetensors` are not keys
    # `section.key` in backticks, or --set section.key=...; file names such as `model.safetensors` are not keys
    pattern = re.compile(rf"(?:`|--set )((?:{'|'.join(SECTIONS)})(?:\.\w+)+)(?:`|=)")
    found = {(page.name, key) for page in _pages() if page.name != "configs.md"
             for key in pattern.findall(page.read_text()) if key.rsplit(".", 1)[-1] not in FILE_SUFFIXES}
    assert len(found) > 40  # the pattern does find the keys the pages mention
    missing = sorted((page, key) for page, key in found if key not in DELIBERATE_TYPOS and not _resolves(key))
    assert missing == []
    assert not any(_resolves(key) for key in DELIBERATE_TYPOS)


def _command_lines(page: Path) -> list[str]:
    lines = []
    for block in _doc_code_blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("vlp "):
                lines.append(re.sub(r"\s\[[^\]]*\]", "", line))  # optional [--flag ...] groups
    return lines


def test_vlp_command_lines_in_the_docs_parse() -> None:
    from vlp.cli.main import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    for page in _pages():
        for line in _command_lines(page):
            argv = shlex.split(line)[1:]
            if argv[0] in PENDING_COMMANDS and argv[0] not in commands:
                continue
            try:
                parser.parse_args(argv)
            except UserError as err:
                raise AssertionError(f"{page.name}: `{line}` does not parse: {err}") from None
            checked += 1
    assert checked >= 10


def _slug(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^a-z0-9 _-]", "", text).replace(" ", "-")


def test_links_between_pages_resolve() -> None:
    checked = 0
    for page in _pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to a missing file {target}"
            if anchor and file.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", file.read_text(), re.M)}
                assert anchor in slugs, f"{page.name}: no heading '#{anchor}' in {file.name}"
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("name", ["fusion.md", "design.md"])
def test_python_snippets_run(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlp.registry import image_encoders

    # design.md registers an encoder: keep the registration out of the process-wide registry
    monkeypatch.setattr(image_encoders, "_entries", dict(image_encoders._entries))
    blocks = _doc_code_blocks(DOCS / name, "python")
    assert blocks
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, f"docs/{name}", "exec"), namespace)  # each block asserts its own claims
