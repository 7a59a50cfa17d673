"""Guards around the training loop, as Trainer callbacks: interrupts, a loss watchdog, early stopping.

- InterruptGuard: SIGINT / SIGTERM (and SIGUSR1, which SLURM sends before a time limit) during
  training finish the current optimiser step, save a checkpoint and stop; the stage then raises
  RunInterrupted and run.py marks summary.json "interrupted" (`resume=true` continues the run).
  A second Ctrl-C stops at once. Test hook: MEDGPT_TEST_INTERRUPT_AT_STEP=<n> sends SIGINT to the
  process itself after step n, so tests interrupt at a known step (the real signal path runs).
- LossWatchdog: a NaN/Inf training loss, or a loss more than `watchdog.threshold` above the median of
  the recent losses for `watchdog.patience` logging steps in a row, saves a checkpoint and stops; the
  stage raises TrainingDiverged (one sentence; the run is marked failed). The threshold is additive:
  losses are log-perplexities, so +2 means 7x the perplexity at any loss level.
- EarlyStopping: stops after `method.early_stopping_patience` evaluations during training without a
  lower eval loss; the run then finishes normally (final eval, save) and records where it stopped.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import threading
from collections import deque

from transformers import TrainerCallback

from medgpt.errors import MedgptError

TEST_INTERRUPT_ENV = "MEDGPT_TEST_INTERRUPT_AT_STEP"


class TrainingDiverged(MedgptError):
    """The loss watchdog stopped training (a checkpoint was saved)."""


class InterruptGuard(TrainerCallback):
    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self._test_step = int(os.environ.get(TEST_INTERRUPT_ENV, "0") or 0)

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now, without a checkpoint
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then stopping "
              "(send it again to stop at once)", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self._test_step and state.global_step == self._test_step and self.signum is None:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line (main thread)
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class LossWatchdog(TrainerCallback):
    def __init__(self, threshold: float = 2.0, patience: int = 3, window: int = 20):
        self.threshold, self.patience = threshold, max(1, patience)
        self.recent: deque[float] = deque(maxlen=max(3, window))
        self.spikes = 0
        self.reason: str | None = None
        self.step: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is None or self.reason:
            return
        if not math.isfinite(loss):
            return self._stop(control, state.global_step, f"the training loss is {loss} at step {state.global_step}")
        reference = statistics.median(self.recent) if len(self.recent) >= 3 else None
        if reference is not None and loss > reference + self.threshold:
            self.spikes += 1
            if self.spikes >= self.patience:
                self._stop(control, state.global_step, f"the training loss rose more than {self.threshold:g} above its recent median "
                           f"({reference:.4g}) for {self.spikes} steps in a row, to {loss:.4g} at step {state.global_step}")
            return
        self.spikes = 0
        self.recent.append(loss)

    def _stop(self, control, step: int, reason: str) -> None:
        self.reason, self.step = reason, step
        control.should_save = True
        control.should_training_stop = True


class EarlyStopping(TrainerCallback):
    def __init__(self, patience: int):
        self.patience = patience
        self.best: float | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None
        self._training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self._training = True

    def on_train_end(self, args, state, control, **kwargs):
        self._training = False

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if not self._training or loss is None:
            return
        if self.best is None or loss < self.best:
            self.best, self.bad_evals = loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            self.stopped_at = state.global_step
            control.should_training_stop = True
