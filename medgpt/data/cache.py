"""Tokenised datasets cached by a content hash, so a second run of the same data does no tokenisation.

The key covers the bytes of every data file (every file of an Arrow dataset folder), the template, the
tokenizer (its full serialisation), the lengths and every knob that changes the tokens. The builder gets a
work folder beside the entry for what it streams to disk (records, tokenised shards); the entry is written
to a temporary folder and renamed into place, so parallel sweep jobs never read a half-written entry, and
then read back memory-mapped, so the data of a fresh build is not held in RAM either.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict, disable_progress_bars, load_from_disk

log = logging.getLogger(__name__)
disable_progress_bars()  # saving a few hundred rows needs no bar
CACHE_VERSION = 4  # bump when tokenisation code changes what it produces (4: entries hold the held-out records)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    specials = json.dumps({k: str(v) for k, v in tokenizer.special_tokens_map.items()}, sort_keys=True)
    return hashlib.sha256((blob + specials).encode()).hexdigest()


def content_key(files: list[Path], settings: dict) -> str:
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, **settings}, sort_keys=True, default=str).encode())
    for path in files:
        h.update(str(path.name).encode())
        for part in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
            h.update(str(part.relative_to(path)).encode() if part != path else b"")
            with open(part, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:24]


def cached_datasets(cache_dir: Path, key: str, build: Callable[[Path], tuple[dict[str, Dataset], dict]]) -> tuple[dict[str, Dataset], dict, bool]:
    """Load the entry `key`, or build it with `build(work folder)` -> (splits, stats) and store it. Returns (splits, stats, hit)."""
    entry = Path(cache_dir) / "tokenized" / key
    if (entry / "stats.json").exists():
        try:
            splits = load_from_disk(str(entry / "data"))
            return dict(splits), json.loads((entry / "stats.json").read_text()), True
        except Exception as e:  # a corrupt entry is rebuilt, never fatal
            log.warning("tokenised-data cache entry %s unreadable (%s); rebuilding", entry, e)
    entry.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".work-{key}-"))
    try:
        splits, stats = build(work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}-"))
    try:
        DatasetDict(splits).save_to_disk(str(tmp / "data"))
        (tmp / "stats.json").write_text(json.dumps(stats))
        if entry.exists():
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
        splits = dict(load_from_disk(str(entry / "data")))  # memory-mapped from the entry: the work folder can go
    except OSError as e:  # another process won the race, or the disk is full: the data is still usable
        log.info("tokenised data not cached (%s)", e)
        shutil.rmtree(tmp, ignore_errors=True)
        return splits, stats, False  # still backed by the work folder, which stays until the cache is cleared
    shutil.rmtree(work, ignore_errors=True)
    return splits, stats, False
