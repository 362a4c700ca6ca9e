"""Rows of a user's data file: JSONL, Parquet, or a folder saved by `datasets`.

Prompt sets and preference sets are read the same way; each row keeps where it came
from (``path:line`` for JSONL, ``path: row N`` for tables) so a bad row is reported at
its place. The caller's error class carries every message.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

ACCEPTED_FORMS = (
    "a .jsonl file, a .parquet file, "
    "or a folder written by datasets' save_to_disk (Dataset or DatasetDict)"
)


class Record(NamedTuple):
    where: str  # "path:line" for JSONL, "path: row N" for tables
    record: dict[str, Any]
    split: str | None = None  # imposed by the container (a DatasetDict split)


DatasetDictReader = Callable[[Any, Path], Iterator[Record]]


def read_records(
    path: Path, error: type[Exception], accepted: str, dataset_dict: DatasetDictReader
) -> Iterator[Record]:
    """Every row of ``path``; ``dataset_dict`` decides which splits of a DatasetDict count."""
    if not path.exists():
        raise error(f"{path}: no such file or folder; expected {accepted}")
    if path.is_dir():
        return _read_dataset_folder(path, error, accepted, dataset_dict)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, error)
    if path.suffix == ".parquet":
        return _read_parquet(path, error)
    raise error(f"{path}: unsupported file type '{path.suffix}'; expected {accepted}")


def dataset_rows(dataset: Any, label: str, split: str | None = None) -> Iterator[Record]:
    for number, record in enumerate(dataset, start=1):
        yield Record(f"{label}: row {number}", record, split)


def _read_jsonl(path: Path, error: type[Exception]) -> Iterator[Record]:
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = f"byte {raw[err.start]:#04x} at column {err.start + 1}"
                raise error(f"{where}: not UTF-8 text ({byte})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise error(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(record, dict):
                raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield Record(where, record)


def _read_parquet(path: Path, error: type[Exception]) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise error(f"{path}: not a readable Parquet file: {err}") from None
    return dataset_rows(table.to_pylist(), str(path))


def _read_dataset_folder(
    path: Path, error: type[Exception], accepted: str, dataset_dict: DatasetDictReader
) -> Iterator[Record]:
    import datasets  # heavy; only for this source

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise error(
            f"{path}: folder is not a saved datasets Dataset; expected {accepted}"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        return dataset_rows(loaded, str(path))
    return dataset_dict(loaded, path)
