"""Data sources: what a `data.train_files` / `data.eval_files` entry names, how its raw records are read, and the mix.

An entry is one source:
  file        .jsonl / .json (a list of records) / .txt (one document per line) / .parquet / .csv
  folder      every data file under it (recursive, sorted by path); or an Arrow dataset saved by
              `datasets` (`save_to_disk`: a folder with dataset_info.json / state.json), read with `load_from_disk`
  glob        `data/sft/*.jsonl`: the matching files (and folders) together, sorted
  hub id      `owner/name` that is no local path: `datasets.load_dataset(owner/name, split="train")` for users with a
              network; offline (HF_HUB_OFFLINE=1) it is refused in one sentence
Parquet, CSV and Arrow are read through the `datasets` library (memory-mapped Arrow, not loaded into RAM);
JSON lines stay line-by-line. A UTF-8 byte-order mark is accepted (.jsonl/.json/.csv) and stripped (.txt).
Every raw record comes with its line (JSON lines, text) or its 1-based row (JSON list, Parquet, CSV, Arrow), so
errors say `file:line`.

Mixing (`data.mix`, training sources only): per-source weights (`data.mix_by=weight`: the named sources share
their total record count in the given ratio, a source repeated or subsampled to reach its share) or sample counts
(`mix_by=count`); sources not named keep all their records. Subsamples and the remainder of a repeat are drawn
with `seed`, so a mix is deterministic. `data.max_samples` caps every source (its first N records) before mixing.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt.errors import DataError

DATA_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv")
ARROW_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what datasets' save_to_disk writes
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Source:
    """One data entry: its name (a `data.mix` key), the entry as written, and what it reads."""

    name: str
    entry: str
    files: list[Path] = field(default_factory=list)  # data files, or an Arrow dataset folder
    hub_id: str | None = None


def _source_name(entry: str) -> str:
    base = entry.rstrip("/").rsplit("/", 1)[-1]
    return base[: -len(Path(base).suffix)] if Path(base).suffix.lower() in DATA_SUFFIXES else base


def is_arrow_folder(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in ARROW_MARKERS)


def _folder_files(folder: Path) -> list[Path]:
    """Data files under `folder` (recursive, sorted by path; hidden entries skipped), an Arrow folder as one entry."""
    if is_arrow_folder(folder):
        return [folder]
    found: list[Path] = []
    for top, dirs, files in os.walk(folder):
        arrow = [d for d in dirs if is_arrow_folder(Path(top) / d)]
        found += [Path(top) / d for d in arrow]
        dirs[:] = [d for d in dirs if d not in arrow and not d.startswith(".")]  # the files of an Arrow folder are its own
        found += [Path(top) / f for f in files if Path(f).suffix.lower() in DATA_SUFFIXES and not f.startswith(".")]
    return sorted(found)


def resolve_sources(entries: list[str], root: Path, key: str = "data.train_files") -> list[Source]:
    """The sources the entries of `key` name; each missing path, empty folder or unknown file type is one sentence."""
    sources = []
    for entry in entries:
        p = Path(entry) if Path(entry).is_absolute() else root / entry
        if glob.has_magic(str(p)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            files = [f for m in matches for f in (_folder_files(m) if m.is_dir() else [m])]
            if not files:
                raise DataError(f"no data file matches {entry}; check {key}.")
        elif p.is_dir():
            files = _folder_files(p)
            if not files:
                raise DataError(f"{key}: the folder {entry} holds no data files ({', '.join(DATA_SUFFIXES)}, or an Arrow "
                                "dataset saved with datasets' save_to_disk), also in its subfolders.")
        elif p.is_file():
            files = [p]
        elif HUB_ID.match(entry) and Path(entry).suffix.lower() not in DATA_SUFFIXES:
            sources.append(Source(_source_name(entry), entry, hub_id=entry))
            continue
        else:
            raise DataError(f"data file {entry} does not exist (looked in {p.parent}); check {key}.")
        for f in files:
            if f.is_file() and f.suffix.lower() not in DATA_SUFFIXES:
                raise DataError(f"{f}: unsupported file type '{f.suffix}' (use {', '.join(DATA_SUFFIXES)} or an Arrow folder).")
        sources.append(Source(_source_name(entry), entry, files))
    return sources


def expand_files(patterns: list[str], root: Path) -> list[Path]:
    """Every data file (or Arrow folder) the entries name, in order (hub sources have none)."""
    files = [f for s in resolve_sources(list(patterns), root) for f in s.files]
    if not files and patterns and not any(HUB_ID.match(p) for p in patterns):
        raise DataError(f"no data file matches {patterns}; check data.train_files / data.eval_files.")
    return files


def hub_rows(hub_id: str) -> Iterator[tuple[int, Any]]:
    """Rows of a hub dataset's train split (networked users only)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise DataError(f"{hub_id} is no local file or folder, and the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE is "
                        "set); download the dataset and point data.train_files at its files or folder.")
    from datasets import load_dataset

    try:
        ds = load_dataset(hub_id, split="train")
    except Exception as e:  # network, missing dataset, no train split: one sentence
        raise DataError(f"{hub_id}: the hub dataset could not be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    yield from ((i + 1, row) for i, row in enumerate(ds))


def iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number, raw record) pairs; .txt yields strings, everything else dicts (a bad JSON line: a DataError)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            yield from _columnar_rows(path, "arrow")
        elif suffix == ".txt":
            with open(path, encoding="utf-8-sig") as fh:
                for lineno, line in enumerate(fh, 1):
                    if line.strip():
                        yield lineno, line.rstrip("\n")
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8-sig") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        yield lineno, json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as e:
                        yield lineno, DataError(f"{path}:{lineno}: invalid JSON ({json_problem(e)}).")
        elif suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json data file must hold a list of records.")
            yield from ((i + 1, r) for i, r in enumerate(data))  # "line" = record number here
        elif suffix in (".parquet", ".csv"):
            yield from _columnar_rows(path, suffix[1:])
        else:
            raise DataError(f"{path}: unsupported file type '{suffix}' (use {', '.join(DATA_SUFFIXES)} or an Arrow folder).")
    except UnicodeDecodeError as e:
        lineno = _line_of_byte(path, e.start)
        raise DataError(f"{path}:{lineno}: not valid UTF-8 text (byte {e.start}); convert the file to UTF-8.") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({json_problem(e)}).") from None


def json_problem(e: json.JSONDecodeError) -> str:
    """`Unterminated string starting at column 5`, not `... starting at at column 5`."""
    return f"{e.msg.removesuffix(' at')} at column {e.colno}"


def _line_of_byte(path: Path, offset: int) -> int:
    with open(path, "rb") as fh:
        return fh.read(offset).count(b"\n") + 1


def _columnar_rows(path: Path, kind: str) -> Iterator[tuple[int, dict]]:
    """Rows of a Parquet/CSV file or an Arrow folder, read by `datasets` (memory-mapped), numbered from 1."""
    from datasets import Dataset, DatasetDict, load_from_disk

    try:
        if kind == "arrow":
            ds = load_from_disk(str(path))
            if isinstance(ds, DatasetDict):
                raise DataError(f"{path}: the Arrow dataset holds several splits ({', '.join(ds)}); point data.train_files / "
                                f"data.eval_files at one split's folder ({path}/{next(iter(ds))}).")
        elif kind == "parquet":
            ds = Dataset.from_parquet(str(path))
        else:
            ds = Dataset.from_csv(str(path), encoding="utf-8-sig", keep_default_na=False, na_values=[""])
    except DataError:
        raise
    except Exception as e:  # pyarrow/pandas/datasets errors: one sentence naming the file
        what = {"arrow": "a readable Arrow dataset folder (datasets.load_from_disk)", "parquet": "a readable Parquet file",
                "csv": "a readable CSV file"}[kind]
        raise DataError(f"{path}: not {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).") from None
    for start in range(0, len(ds), 1000):
        batch = ds[start:start + 1000]
        for i in range(len(next(iter(batch.values()), []))):
            yield start + i + 1, {k: v[i] for k, v in batch.items()}


def source_rows(source: Source) -> Iterator[tuple[str, Any]]:
    """("file:line", raw record) for every record of a source, in order."""
    if source.hub_id:
        yield from ((f"{source.hub_id}:{row}", raw) for row, raw in hub_rows(source.hub_id))
        return
    for path in source.files:
        empty = True
        for line, raw in iter_raw(path):
            empty = False
            yield f"{path}:{line}", raw
        if empty:
            raise DataError(f"{path}: the file holds no records.")


# --- mixing ---

def mix_targets(sizes: dict[str, int], mix: Mapping, mix_by: str, entries: dict[str, str]) -> dict[str, int]:
    """Records each training source contributes under `data.mix` (`sizes`: records per source name after max_samples).

    `entries` maps each source name to its entry as written; a mix key may be either."""
    if not isinstance(mix, Mapping):
        raise DataError(f"data.mix={mix!r} must be a mapping {{source name: weight}}, e.g. data.mix={{a: 3, b: 1}}.")
    by_entry = {entry: name for name, entry in entries.items()}
    named: dict[str, float] = {}
    for key, value in mix.items():
        name = key if key in sizes else by_entry.get(key)
        if name is None:
            raise DataError(f"data.mix key '{key}' names no training source (sources: {', '.join(sizes)}).")
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise DataError(f"data.mix.{key}={value} must be a number >= 0.")
        if mix_by == "count" and value != int(value):
            raise DataError(f"data.mix.{key}={value} must be a whole number of records with data.mix_by=count.")
        named[name] = float(value)
    targets = dict(sizes)
    if mix_by == "count":
        targets.update({name: int(v) for name, v in named.items()})
    elif named:
        total = sum(named.values())
        if not total > 0:
            raise DataError(f"data.mix weights {dict(mix)} sum to {total:g}; give at least one source a positive weight.")
        pool = sum(sizes[name] for name in named)
        targets.update({name: round(pool * w / total) for name, w in named.items()})
    for name, n in targets.items():
        if n and not sizes[name]:
            raise DataError(f"data.mix asks for {n} records of source '{name}', which has none left for training.")
    return targets


def mixed_indices(size: int, target: int, seed: int, name: str) -> list[int]:
    """`target` indices into a source of `size` records: whole passes in order, the remainder a seeded sample (kept in
    order). Deterministic for (seed, name)."""
    if size <= 0 or target <= 0:
        return []
    passes, rest = divmod(target, size)
    rng = random.Random(f"{seed}:{name}")
    return [i for _ in range(passes) for i in range(size)] + sorted(rng.sample(range(size), rest))
