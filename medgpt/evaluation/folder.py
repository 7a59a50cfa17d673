"""One evaluation's folder, `<dir>/eval/<suite>[-<hash>]/`: which folder, who writes it, and what is already done.

    settings.json      the settings that change results, the evaluated files' sha256, the model: written when
                       the folder is made, compared on every later run (a folder never mixes two of them)
    predictions.jsonl  one row per question, appended and flushed batch by batch; a rerun skips the ids in it
                       (resume), and drops a half-written last row left by a crash
    results.json       the metrics over every row, written last (under the run's update lock in a run directory)

Folder names: the suite's own name (`eval/mcq/`) when the settings equal the suite's defaults (conf/eval/<suite>.yaml),
else `<suite>-<first 8 hex of sha1(settings)>` (`eval/mcq-1a2b3c4d/`), so different files or scoring settings
never share predictions. A folder is locked (`.lock`, flock) while an evaluation writes it: a second one is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path

from medgpt.errors import ConfigError
from medgpt.tracking.rundir import RunDir, read_json, write_json


def settings_hash(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def folder_name(suite: str, settings: dict, defaults: dict | None) -> str:
    return suite if settings == defaults else f"{suite}-{settings_hash(settings)}"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class EvalFolder:
    """`eval/<name>/` inside `owner` (a run directory, or the directory of a bare-model evaluation)."""

    def __init__(self, owner: RunDir, name: str, guard: dict):
        self.owner, self.name, self.guard = owner, name, guard
        self.path = owner.eval_dir(name)
        self._fd: int | None = None

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.jsonl"

    @property
    def results(self) -> Path:
        return self.path / "results.json"

    @property
    def settings_file(self) -> Path:
        return self.path / "settings.json"

    @contextlib.contextmanager
    def claimed(self):
        """Lock the folder for this evaluation and check it holds nothing else (settings.json)."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"another mode=eval is writing {self.path}; wait for it to finish.") from None
        try:
            self._check_guard()
            yield self
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _check_guard(self) -> None:
        saved = read_json(self.settings_file)
        if not saved:
            if self.predictions.exists() and self.predictions.stat().st_size:
                raise ConfigError(f"{self.path} holds predictions without a settings.json: move it away to evaluate again.")
            write_json(self.settings_file, self.guard)
            return
        for key in ("settings", "files", "model"):
            if saved.get(key) != self.guard.get(key):
                raise ConfigError(f"{self.path} holds predictions for different {'data files' if key == 'files' else key} "
                                  f"({_difference(saved.get(key), self.guard.get(key))}): move that folder away to evaluate again.")

    def done(self) -> dict[str, dict]:
        """Rows already in predictions.jsonl by id; a broken row (a crash mid-write) is dropped from the file."""
        if not self.predictions.exists():
            return {}
        rows, good, broken = {}, [], False
        for line in self.predictions.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                rows[str(row["id"])] = row
                good.append(line)
            except (ValueError, KeyError, TypeError):
                broken = True
        if broken:
            self.predictions.write_text("".join(g + "\n" for g in good), encoding="utf-8")
        return rows

    @contextlib.contextmanager
    def appender(self):
        """`write(rows)`: append rows and flush them to disk (a batch survives a crash right after it)."""
        with open(self.predictions, "a", encoding="utf-8") as fh:
            def write(rows: list[dict]) -> None:
                fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
                fh.flush()
                os.fsync(fh.fileno())

            yield write

    def write_results(self, results: dict) -> None:
        """results.json, atomically; under the owner's update lock (a finished run's other writers take it too)."""
        with self.owner.update_lock():
            write_json(self.results, results)


def _difference(saved, now) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        return "; ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in keys[:2])
    return f"{saved!r} then, {now!r} now"
