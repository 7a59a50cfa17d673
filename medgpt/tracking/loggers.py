"""Experiment trackers beside metrics.jsonl: W&B (logger=wandb) and TensorBoard (logger=tensorboard).

run.py starts one tracker per run (`start`) and finishes it with the final summary (`finish`); the
MetricsCallback hands every metrics.jsonl row to `active().log(row)`, so the tracker sees exactly the
same keys (step, loss, lr, eval_loss, rewards/margins, ...).

W&B: project, entity, group (the sweep) and tags (the group choices) come from the `logger` config;
the resolved config is uploaded; files go to `<run>/wandb/`. Without an API key or a network the run
is logged offline, with a line saying how to `wandb sync` it later (WANDB_MODE, when set, decides).
TensorBoard: event files in `<run>/tensorboard/`. A tracker that fails is switched off with a warning:
it never stops training.

What leaves the machine (W&B online) is only what training needs to be compared: the config, the metrics
rows, and the numbers of the final summary. The sample answers before and after training (held-out
questions, reference answers, model answers: they can hold patient text) and the data statistics go to
the tracker only with `logger.log_samples=true` (samples as a table: W&B's `samples`, TensorBoard's text).
summary.json keeps them in every case.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import secrets
import socket
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


PRIVATE = ("samples", "data")  # summary.json fields a tracker gets only with logger.log_samples=true
SAMPLE_COLUMNS = ("question", "reference", "before", "after")


class Tracker:
    """No tracker (logger=none); the base of the others. Failures are logged once and switch the tracker off."""

    name = "none"

    def __init__(self, log_samples: bool = False):
        self.failed = False
        self.log_samples = log_samples  # logger.log_samples: sample answers and data statistics too

    def log(self, row: dict) -> None:
        self._safely("log", self._log, row)

    def finish(self, summary: dict, status: str) -> None:
        samples = summary.get("samples") if self.log_samples else None
        if not self.log_samples:
            summary = {k: v for k, v in summary.items() if k not in PRIVATE}
        if samples:  # a failure here still lets the summary through
            self._safely("samples", self._samples, [[str(s.get(c, "")) for c in SAMPLE_COLUMNS] for s in samples], switch_off=False)
        self._safely("finish", self._finish, summary, status)

    def _safely(self, what: str, fn, *args, switch_off: bool = True) -> None:
        if self.failed:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a tracker must never stop training
            self.failed = switch_off
            log.warning("%s %s failed (%s: %s)%s, metrics.jsonl is complete", self.name, what, type(e).__name__, e,
                        "; it is off for the rest of this run" if switch_off else "")

    def _log(self, row: dict) -> None:
        pass

    def _finish(self, summary: dict, status: str) -> None:
        pass

    def _samples(self, rows: list[list[str]]) -> None:
        pass


def scalars(data: dict) -> dict:
    """The numbers of a (nested) dict, flattened with '/' (what trackers can chart)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in scalars(value).items()})
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
    return out


class WandbTracker(Tracker):
    name = "W&B"

    def __init__(self, cfg: DictConfig, run_dir: Path):
        super().__init__(bool(cfg.logger.get("log_samples", False)))
        import wandb

        mode, reason = wandb_mode()
        id_file = run_dir / "wandb" / "medgpt_run_id"  # the same W&B run when this run is resumed
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        lg = cfg.logger
        self.run = wandb.init(project=lg.project, entity=lg.entity, group=lg.group, tags=[t[:64] for t in lg.tags], name=run_dir.name,
                              config=OmegaConf.to_container(cfg, resolve=True), dir=str(run_dir), id=run_id, resume="allow",
                              mode=mode, job_type=cfg.method.name, settings=wandb.Settings(console="off"))
        self._step = None  # the step whose values are accumulated but not yet committed
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # metrics.jsonl's step is the x axis (monotonic within each stage)
        if mode == "offline":
            where = Path(self.run.dir).parent
            log.info("W&B is offline (%s): the run is kept in %s; upload it later with: wandb sync %s", reason, where, where)

    def _log(self, row: dict) -> None:
        # metrics.jsonl has one row per step (an eval after a training step joins its row): W&B gets the same rows,
        # by accumulating a step's values and committing them when the next step begins (or at finish)
        if self._step is not None and row.get("step") != self._step:
            self.run.log({}, commit=True)
        self._step = row.get("step")
        self.run.log({k: v for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}, commit=False)

    def _samples(self, rows: list[list[str]]) -> None:
        import wandb

        self.run.summary["samples"] = wandb.Table(columns=list(SAMPLE_COLUMNS), data=rows)

    def _finish(self, summary: dict, status: str) -> None:
        self.run.summary.update({**scalars(summary), "status": status})
        self.run.finish(exit_code=0 if status == "completed" else 1)


class TensorBoardTracker(Tracker):
    name = "TensorBoard"

    def __init__(self, cfg: DictConfig, run_dir: Path):
        super().__init__(bool(cfg.logger.get("log_samples", False)))
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "\n```")
        log.info("TensorBoard: tensorboard --logdir %s", run_dir / "tensorboard")

    def _log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def _samples(self, rows: list[list[str]]) -> None:
        cell = lambda text: text.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731 - a markdown table cell
        table = [f"| {' | '.join(SAMPLE_COLUMNS)} |", "|" + " --- |" * len(SAMPLE_COLUMNS)]
        self.writer.add_text("samples", "\n".join(table + [f"| {' | '.join(cell(c) for c in row)} |" for row in rows]))

    def _finish(self, summary: dict, status: str) -> None:
        for key, value in scalars(summary).items():
            self.writer.add_scalar(f"summary/{key}", value, 0)
        self.writer.add_text("status", status)
        self.writer.close()


def wandb_mode() -> tuple[str, str | None]:
    """online, or offline with the reason: no API key, or the W&B server cannot be reached. WANDB_MODE wins when set."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], "WANDB_MODE is set"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    if not os.environ.get("WANDB_API_KEY"):
        try:
            if not netrc.netrc().authenticators(host):
                return "offline", "no API key: run `wandb login` or set WANDB_API_KEY"
        except (OSError, netrc.NetrcParseError):
            return "offline", "no API key: run `wandb login` or set WANDB_API_KEY"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return "offline", f"{host} cannot be reached"
    return "online", None


TRACKERS = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}
_active: Tracker = Tracker()


def start(cfg: DictConfig, run_dir: Path) -> Tracker:
    """The tracker named by logger.name for this run (a no-op one for logger=none, or when it cannot start)."""
    global _active
    _active = Tracker()
    factory = TRACKERS.get(cfg.logger.name)
    if factory is not None:
        try:
            _active = factory(cfg, run_dir)
        except Exception as e:  # noqa: BLE001 - never stop training for a tracker
            log.warning("%s could not start (%s: %s); training goes on, metrics.jsonl is complete", cfg.logger.name, type(e).__name__, e)
    return _active


def active() -> Tracker:
    return _active


def finish(summary: dict, status: str) -> None:
    global _active
    tracker, _active = _active, Tracker()
    tracker.finish(summary, status)
