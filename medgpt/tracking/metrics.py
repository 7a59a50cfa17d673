"""metrics.jsonl: one JSON object per logging step, written as training goes (a crash keeps what was logged).

Keys: step, epoch, loss, lr, grad_norm, tokens_per_s, samples_per_s, mem_gb, and eval_* rows
(eval_loss, eval_perplexity). Stages may add their own (e.g. rewards/margins for DPO). Every row also
goes to the run's tracker (W&B / TensorBoard, medgpt.tracking.loggers), so both see the same keys.

The console shows the progress bar only: `quiet_progress` keeps the Trainer's bar but drops the log dicts it
printed beside it (numbers as quoted strings; metrics.jsonl has them), and importing this module filters two
messages libraries print on every CPU run (see `quiet_library_noise`).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback


def quiet_library_noise() -> None:
    """Two messages of no use to a medgpt user, silenced at their source (this module is imported by every training run):
    - peft (0.18) reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning;
    - accelerate imports DeepSpeed whenever it is installed (to unwrap a possible DeepSpeedEngine), and DeepSpeed's
      import logs "Setting accelerator to CPU ..." on a machine without a GPU (on CPU runs DeepSpeed is never used:
      deepspeed=... is refused without CUDA). A filter on its "DeepSpeed" logger drops that one record; the
      filter stays when DeepSpeed later sets up the logger, and its other messages pass.
    """
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    deepspeed_logger = logging.getLogger("DeepSpeed")
    if not any(getattr(f, "medgpt", False) for f in deepspeed_logger.filters):
        deepspeed_logger.addFilter(_NotCpuFallback())


class _NotCpuFallback(logging.Filter):
    medgpt = True

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Setting accelerator to CPU")


quiet_library_noise()


class QuietProgressCallback(ProgressCallback):
    """The Trainer's progress bars without the log dicts it writes beside them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def quiet_progress(trainer) -> None:
    """Swap the Trainer's ProgressCallback (or PrinterCallback, with disable_tqdm) for QuietProgressCallback."""
    had_bar = trainer.pop_callback(ProgressCallback) is not None
    trainer.pop_callback(PrinterCallback)
    if had_bar:
        trainer.add_callback(QuietProgressCallback)

RENAME = {"learning_rate": "lr"}
DROP = {"total_flos", "num_input_tokens_seen", "train_runtime", "train_tokens_per_second", "eval_model_preparation_time"}


def memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return float("nan")


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


class MetricsWriter:
    """Appends rows; a row for the step the last row already has (an eval after that training step) is merged
    into it, so metrics.jsonl holds exactly one row per step (written by rank 0 alone)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._last: dict | None = None  # the last row this writer wrote, and where its line starts
        self._last_at = 0

    def write(self, row: dict) -> None:
        row = {k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in row.items()}
        with open(self.path, "a+b") as fh:
            fh.seek(0, 2)
            end = fh.tell()
            if self._last is not None and self._last.get("step") == row.get("step") and self._last_at <= end:
                row = {**self._last, **row}
                fh.truncate(self._last_at)  # rewrite the last line with the merged row
                end = self._last_at
            fh.write((json.dumps(row) + "\n").encode())
        self._last, self._last_at = row, end

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


class MetricsCallback(TrainerCallback):
    """Turns the Trainer's log events into metrics.jsonl rows with throughput and memory added."""

    def __init__(self, writer: MetricsWriter | None, batch_size: int, perplexity: bool = True, tracker=None, resuming: bool = False):
        self.writer = writer
        self.perplexity = perplexity  # exp(eval_loss) means something for language-modelling losses only
        self.batch_size = batch_size  # sequences per optimiser step on this process
        self.tracker = tracker  # has .log(row); never raises
        self.resuming = resuming  # a resumed run's rows before training restarts (the eval before) are in metrics.jsonl already
        self._training_started = False
        self._last = (time.perf_counter(), 0, 0)  # time, tokens seen, step

    def on_train_begin(self, args, state, control, **kwargs):
        self._training_started = True
        self._last = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        if "train_loss" in logs or (self.resuming and not self._training_started):  # the end-of-training aggregate goes to summary.json
            return
        row: dict = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            t0, tok0, step0 = self._last
            elapsed = max(now - t0, 1e-9)
            row.update(tokens_per_s=(tokens - tok0) / elapsed, samples_per_s=(state.global_step - step0) * self.batch_size / elapsed,
                       tokens_seen=tokens)
            self._last = (now, tokens, state.global_step)
        for key, value in logs.items():
            if key in DROP or key.endswith(("_runtime", "_samples_per_second", "_steps_per_second")):
                continue
            row[RENAME.get(key, key)] = value
        if "eval_loss" in row and self.perplexity:
            row["eval_perplexity"] = perplexity(row["eval_loss"])
        row["mem_gb"] = memory_gb()
        if self.writer is not None:  # None on ranks other than 0
            self.writer.write(row)
        if self.tracker is not None:
            self.tracker.log(row)
