"""Image-text pairs as CSV/TSV tables, the format of open_clip's ``--dataset-type csv``.

One row per caption, a header naming the columns; by default tab-separated with the image path under
``filepath`` and the caption under ``title`` (open_clip's ``--csv-separator``, ``--csv-img-key`` and
``--csv-caption-key``; in vlp ``data.csv_separator``, ``data.csv_image_key``, ``data.csv_caption_key``).
A file is read as a table when its name ends in ``.csv`` or ``.tsv``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlp.errors import UserError

__all__ = ["CsvFormat", "TABLE_SUFFIXES", "is_table_file", "read_csv_records"]

TABLE_SUFFIXES = (".csv", ".tsv")


@dataclass(frozen=True)
class CsvFormat:
    """How to read a pairs table: the column separator and the image-path and caption column names."""

    separator: str = "\t"
    image_key: str = "filepath"
    caption_key: str = "title"

    def __post_init__(self) -> None:
        # "\t" typed on a command line arrives as two characters
        if self.separator == "\\t":
            object.__setattr__(self, "separator", "\t")
        if len(self.separator) != 1:
            raise UserError(f"the CSV separator must be one character (a tab by default), got {self.separator!r}")
        for what, key in (("image", self.image_key), ("caption", self.caption_key)):
            if not key:
                raise UserError(f"the CSV {what} column name is empty")


def is_table_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in TABLE_SUFFIXES


def _missing_column(path: Path, key: str, what: str, option: str, header: list[str], fmt: CsvFormat) -> UserError:
    hint = ""
    if len(header) == 1:
        guessed = next((s for s in (",", "\t", ";", "|") if s != fmt.separator and s in header[0]), None)
        if guessed is not None:
            hint = f"; the header looks {'tab' if guessed == chr(9) else repr(guessed)}-separated: set the separator"
    return UserError(f"{path}: no {what} column '{key}' (set {option}); columns: {header}{hint}")


def read_csv_records(path: str | Path, fmt: CsvFormat | None = None) -> list[tuple[str, dict[str, Any]]]:
    """A pairs table -> [(location, {"image", "caption"[, "image_id"]})], location = "line N" (of the file).

    Rows with an ``image_id`` column keep it (rows sharing one are captions of one image). Non-UTF-8 bytes
    are replaced; a missing file or column, or a row with too few fields, is a UserError naming the line.
    """
    fmt = fmt or CsvFormat()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    text = path.read_bytes().decode("utf-8-sig", errors="replace")
    reader = csv.reader(text.splitlines(keepends=True), delimiter=fmt.separator)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header row)") from None
    except csv.Error as err:
        raise UserError(f"{path}:1: malformed CSV ({err})") from None
    columns = {name: index for index, name in enumerate(header)}
    if fmt.image_key not in columns:
        raise _missing_column(path, fmt.image_key, "image", "data.csv_image_key / --csv-img-key", header, fmt)
    if fmt.caption_key not in columns:
        raise _missing_column(path, fmt.caption_key, "caption", "data.csv_caption_key / --csv-caption-key",
                              header, fmt)
    image_col, caption_col = columns[fmt.image_key], columns[fmt.caption_key]
    id_col = columns.get("image_id")
    needed = max(image_col, caption_col, -1 if id_col is None else id_col) + 1
    records: list[tuple[str, dict[str, Any]]] = []
    try:
        for row in reader:
            line = reader.line_num
            if not any(field.strip() for field in row):
                continue
            if len(row) < needed:
                raise UserError(f"{path}:{line}: {len(row)} fields, the header has {len(header)} "
                                f"(separator {fmt.separator!r})")
            record: dict[str, Any] = {"image": row[image_col].strip(), "caption": row[caption_col]}
            if id_col is not None and row[id_col].strip():
                value = row[id_col].strip()
                record["image_id"] = int(value) if value.isdigit() else value
            records.append((f"line {line}", record))
    except csv.Error as err:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    return records
