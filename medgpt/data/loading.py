"""Train/eval data for any stage: sources -> records (on disk) -> hold-out and mix -> tokenised in shards -> cache.

Records are normalised while they are read and written straight to an Arrow file (memory-mapped), never held
as one Python list; the held-out split (data.eval_files, or data.eval_split of the training records) and the
mix (medgpt.data.sources) are index selections on that file. Tokenisation runs the stage's encoder on shards
of SHARD_RECORDS records, in `data.num_proc` forked worker processes (0 = auto: one for small data), each
shard written to disk; the shards are concatenated (memory-mapped), then the stage's `finish` (packing) runs
once over the whole split, so the tokens are exactly those of encoding all records at once. The result goes
into the content-hash cache (medgpt.data.cache) with the held-out records and the statistics, so a cache hit
reads no data file. This is a small pool over shards rather than `datasets.Dataset.map(num_proc=...)`:
map needs one output schema per batch (a shard whose records are all dropped has none) and hashes the
encoder's tokenizer for its own fingerprint, which the content-hash cache already makes unnecessary.
Several ranks: lifecycle.run_stage builds data inside `main_process_first`, so rank 0 tokenises into the
cache and the other ranks then read it.
"""

from __future__ import annotations

import bisect
import json
import logging
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
from datasets import Dataset, Features, Value, concatenate_datasets, load_from_disk
from omegaconf import DictConfig, OmegaConf

from medgpt.data.cache import cached_datasets, content_key, tokenizer_fingerprint
from medgpt.data.formats import LoadReport, Record, detect_format, iter_records
from medgpt.data.sources import Source, expand_files, mix_targets, mixed_indices, resolve_sources, source_rows
from medgpt.errors import DataError

log = logging.getLogger(__name__)
SHARD_RECORDS = 4096  # records encoded per task (a worker holds one shard's Python objects at a time)
AUTO_PROCS_FROM = 50_000  # num_proc=0: one process below this many records, else up to 8 (one per CPU)
RECORD_SCHEMA = pa.schema([("source", pa.string()), ("record", pa.string())])
EVAL_RECORDS = "eval_records"  # the cache entry's split holding the held-out records


def eval_limit(max_samples: int | None) -> int | None:
    return None if max_samples is None else max(8, max_samples // 4)


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic hold-out of `fraction` of n records (at least one, never all): (train, held), each in order."""
    if fraction <= 0:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(n * fraction)), n - 1)
    held = set(order[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    train, held = split_indices(len(records), fraction, seed)
    return [records[i] for i in train], [records[i] for i in held]


def data_format(data: DictConfig, root: Path) -> tuple[str, str]:
    """(the format of data.train_files, where it was seen): data.format, or detected from the first record."""
    sources = resolve_sources(list(data.train_files), root)
    if data.format != "auto":
        first = sources[0]
        return data.format, str(first.files[0] if first.files else first.hub_id)
    for source in sources:
        for where, raw in source_rows(source):
            if isinstance(raw, DataError):
                continue  # reading the records reports it (or skips it with data.on_error=skip)
            try:
                return detect_format(raw, where), where.rsplit(":", 1)[0]
            except DataError:
                if data.on_error != "skip":
                    raise
    raise DataError(f"no usable records in {', '.join(map(str, data.train_files))}.")


# --- records on disk ---

def record_row(rec: Record) -> dict:
    body = {k: v for k, v in asdict(rec).items() if k != "source" and v not in (None, [])}
    return {"source": rec.source, "record": json.dumps(body, ensure_ascii=False)}


def row_records(rows: dict) -> list[Record]:
    """Records back from a batch of rows (columns `source`, `record`)."""
    return [Record(source, **json.loads(body)) for source, body in zip(rows["source"], rows["record"])]


class RecordFile:
    """Records appended to an Arrow stream file in batches; `close()` maps it as a Dataset."""

    BATCH = 1000

    def __init__(self, path: Path):
        self.path, self.count, self.rows = path, 0, []
        self.sink = pa.OSFile(str(path), "wb")
        self.writer = pa.ipc.new_stream(self.sink, RECORD_SCHEMA)

    def append(self, rec: Record) -> None:
        self.rows.append(record_row(rec))
        self.count += 1
        if len(self.rows) >= self.BATCH:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            self.writer.write_batch(pa.RecordBatch.from_pylist(self.rows, schema=RECORD_SCHEMA))
            self.rows = []

    def close(self) -> Dataset:
        self._flush()
        self.writer.close()
        self.sink.close()
        return Dataset.from_file(str(self.path))


@dataclass
class LoadedRecords:
    train: Dataset  # the training records (columns source, record) after hold-out and mix
    eval: list[Record]
    stats: dict  # format, skipped, and per source: records read, used for training, held out


def _unique_names(sources: list[Source]) -> list[str]:
    names: list[str] = []
    for s in sources:
        name, k = s.name, 2
        while name in names:
            name, k = f"{s.name}-{k}", k + 1
        names.append(name)
    return names


def _read(source: Source, fmt: str, data: DictConfig, limit: int | None, report: LoadReport, sink: Callable[[Record], None]) -> str:
    """Normalise a source's records into `sink` (at most `limit`); returns the format seen."""
    kept = 0
    for rec in iter_records(source_rows(source), fmt, dict(data.columns), data.on_error, data.system_prompt, report):
        sink(rec)
        kept += 1
        if limit is not None and kept >= limit:
            break
    return report.format or fmt


def load_sources(data: DictConfig, root: Path, seed: int, workdir: Path) -> LoadedRecords:
    """Read every source (records written to `workdir`), hold out the eval records and apply data.mix."""
    sources = resolve_sources(list(data.train_files), root, "data.train_files")
    names = _unique_names(sources)
    report, fmt = LoadReport(), data.format
    out = RecordFile(workdir / "train-records.arrow")
    bounds = [0]
    for source in sources:
        fmt = _read(source, fmt, data, data.max_samples, report, out.append)
        bounds.append(out.count)
    table = out.close()
    if not out.count:
        raise DataError(f"no usable records in {', '.join(map(str, data.train_files))}" +
                        (f" ({report.skipped} skipped; first error: {report.first_error})" if report.skipped else "."))
    if data.eval_files:
        train_idx, held, eval_report = list(range(out.count)), [], LoadReport()
        for source in resolve_sources(list(data.eval_files), root, "data.eval_files"):
            _read(source, fmt, data, eval_limit(data.max_samples), eval_report, held.append)
        if not held:
            raise DataError(f"no usable records in {', '.join(map(str, data.eval_files))}" +
                            (f" ({eval_report.skipped} skipped; first error: {eval_report.first_error})" if eval_report.skipped else "."))
        report.skipped += eval_report.skipped
        report.first_error = report.first_error or eval_report.first_error
        held_from: Counter = Counter()
    else:
        train_idx, held_idx = split_indices(out.count, data.eval_split, seed)
        held = row_records(table[held_idx]) if held_idx else []
        held_from = Counter(names[bisect.bisect_right(bounds, i) - 1] for i in held_idx)
    if report.skipped:
        log.warning("skipped %d malformed records (data.on_error=skip); first: %s", report.skipped, report.first_error)
    per_source = {name: [i for i in train_idx[bisect.bisect_left(train_idx, lo):bisect.bisect_left(train_idx, hi)]]
                  for name, lo, hi in zip(names, bounds, bounds[1:])}
    if data.mix:
        targets = mix_targets({n: len(idx) for n, idx in per_source.items()}, data.mix, data.mix_by,
                              dict(zip(names, (s.entry for s in sources))))
        per_source = {n: [idx[j] for j in mixed_indices(len(idx), targets[n], seed, n)] for n, idx in per_source.items()}
        chosen = [i for idx in per_source.values() for i in idx]
        if not chosen:
            raise DataError(f"data.mix={dict(data.mix)} leaves no training records.")
        table = table.select(chosen)
    elif len(train_idx) < out.count:
        table = table.select(train_idx)
    stats = {"format": fmt, "skipped": report.skipped, "sources": {
        name: {"entry": s.entry, "records": hi - lo, "train": len(per_source[name]), "held_out": held_from.get(name, 0)}
        for name, s, lo, hi in zip(names, sources, bounds, bounds[1:])}}
    return LoadedRecords(table, held, stats)


def load_train_eval(data: DictConfig, root: Path, seed: int, workdir: Path | None = None) -> tuple[list[Record], list[Record], dict]:
    """(train records, eval records, stats) as lists: for small data and tests (tokenised_splits streams instead)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_sources(data, root, seed, Path(workdir or tmp))
        return row_records(loaded.train[:]), loaded.eval, loaded.stats


# --- tokenisation in shards ---

Encoder = Callable[[list[Record], str], tuple[Dataset, dict]]  # (records, split name) -> (dataset, stats), record by record
Finisher = Callable[[Dataset, str], tuple[Dataset, dict]]  # (a whole split's encoded dataset, split) -> (dataset, more stats)
_JOB: tuple | None = None  # (records, encode, split, workdir) for the forked workers


def worker_count(num_proc: int, records: int) -> int:
    if num_proc:
        return num_proc
    return 1 if records < AUTO_PROCS_FROM else max(1, min(8, os.cpu_count() or 1))


def _encode_shard(task: tuple[int, int, int]) -> tuple[str | None, dict]:
    """Encode records [lo, hi) of the job; several shards: the result is saved under the job's workdir."""
    k, lo, hi = task
    records, encode, split, workdir = _JOB
    ds, stats = encode(row_records(records[lo:hi]), split)
    if workdir is None:
        return ds, stats
    path = workdir / f"{split}-{k:05d}"
    ds.save_to_disk(str(path))
    return str(path), stats


def add_stats(total: dict, more: dict) -> dict:
    for key, value in more.items():
        total[key] = total.get(key, 0) + value if isinstance(value, int | float) and not isinstance(value, bool) else value
    return total


def encode_split(records: Dataset, encode: Encoder, split: str, num_proc: int, workdir: Path,
                 finish: Finisher | None = None) -> tuple[Dataset, dict]:
    """The stage's encoding of every record of a split, shard by shard (in worker processes), then `finish` once."""
    global _JOB
    n = len(records)
    tasks = [(k, lo, min(lo + SHARD_RECORDS, n)) for k, lo in enumerate(range(0, n, SHARD_RECORDS))] or [(0, 0, 0)]
    procs = min(worker_count(num_proc, n), len(tasks))
    _JOB = (records, encode, split, workdir if len(tasks) > 1 else None)
    try:
        if procs > 1:  # fork: the workers inherit the encoder (a closure over tokenizer and template) without pickling
            with multiprocessing.get_context("fork").Pool(procs) as pool:
                results = pool.map(_encode_shard, tasks, chunksize=1)
        else:
            results = [_encode_shard(t) for t in tasks]
    finally:
        _JOB = None
    stats: dict = {}
    for _, shard_stats in results:
        add_stats(stats, shard_stats)
    parts = [load_from_disk(r) if isinstance(r, str) else r for r, _ in results]
    ds = concatenate_datasets([p for p in parts if len(p)] or parts[:1]) if len(parts) > 1 else parts[0]
    if finish is not None:
        ds, more = finish(ds, split)
        stats.update(more)
    return ds, stats


def data_files(data: DictConfig, root: Path) -> list[Path]:
    return expand_files(list(data.train_files) + list(data.eval_files), root)


def cache_settings(cfg: DictConfig, kind: str, template, tokenizer_fp: str) -> dict:
    """Everything besides file contents that changes the tokens of a stage's dataset (hub sources: their ids)."""
    d = cfg.data
    hub = [s.hub_id for key in ("train_files", "eval_files") for s in resolve_sources(list(d[key]), Path(cfg.paths.root)) if s.hub_id]
    return {"kind": kind, "format": d.format, "columns": dict(d.columns), "max_samples": d.max_samples, "eval_split": d.eval_split,
            "mix": OmegaConf.to_container(d.mix) if isinstance(d.mix, DictConfig) else d.mix, "mix_by": d.mix_by, "hub": hub,
            "sources": [list(d.train_files), list(d.eval_files)],
            "system_prompt": d.system_prompt, "seed": cfg.seed, "template": template.__dict__, "tokenizer": tokenizer_fp,
            "method": {k: v for k, v in cfg.method.items() if k in ("max_length", "max_prompt_length", "train_on_inputs", "packing",
                                                                     "drop_last_block")}}


@dataclass
class StageData:
    train: Dataset
    eval: Dataset | None
    eval_records: list[Record]  # held-out records (SFT: for the before/after sample answers)
    stats: dict  # format, skipped records, sources, and per split: examples, tokens, truncation counts, ...
    cache_hit: bool


def records_dataset(records: Iterable[Record]) -> Dataset:
    rows = [record_row(r) for r in records]
    return Dataset.from_dict({"source": [r["source"] for r in rows], "record": [r["record"] for r in rows]},
                             features=Features({"source": Value("string"), "record": Value("string")}))


def tokenised_splits(cfg: DictConfig, stage: str, tokenizer, template, encode: Encoder, finish: Finisher | None = None) -> StageData:
    """Both splits encoded by `encode` (record by record, in shards) and `finish` (whole split), then served from the cache."""
    root = Path(cfg.paths.root)
    key = content_key(data_files(cfg.data, root), cache_settings(cfg, stage, template, tokenizer_fingerprint(tokenizer)))

    def build(workdir: Path):
        loaded = load_sources(cfg.data, root, cfg.seed, workdir)
        splits, stats = {}, dict(loaded.stats)
        for name, recs in (("train", loaded.train), ("eval", records_dataset(loaded.eval) if loaded.eval else None)):
            if recs is not None and len(recs):
                splits[name], stats[name] = encode_split(recs, encode, name, cfg.data.num_proc, workdir, finish)
        if loaded.eval:  # datasets cannot read back a saved split with no rows
            splits[EVAL_RECORDS] = records_dataset(loaded.eval)
        return splits, stats

    splits, stats, hit = cached_datasets(Path(cfg.paths.cache_dir), key, build)
    held_out = splits.pop(EVAL_RECORDS, None)
    eval_records = row_records(held_out[:]) if held_out is not None else []
    return StageData(splits["train"], splits.get("eval"), eval_records, stats, hit)

