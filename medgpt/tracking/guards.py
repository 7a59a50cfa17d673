"""Guards around the training loop, as Trainer callbacks: interrupts, a loss watchdog, early stopping.

- InterruptGuard: SIGINT / SIGTERM (and SIGUSR1, which SLURM sends before a time limit) during
  training finish the current optimiser step, save a checkpoint and stop; the stage then raises
  RunInterrupted and run.py marks summary.json "interrupted" (`resume=true` continues the run).
  Several ranks (torchrun) agree after every step: the step after which any rank saw a signal is the
  last one on every rank (one all-reduce of a number per step), so they save the same checkpoint and
  none waits in a collective for a rank that stopped. A signal 2 s or more after the first stops at
  once; one within 2 s is the same request delivered twice (SLURM signals every process of a step and
  the launcher forwards the signal too; SIGUSR1 arrives directly and forwarded as SIGTERM) and is
  ignored. Test hook: MEDGPT_TEST_INTERRUPT_AT_STEP=<n> sends SIGINT to the process itself after
  step n, so tests interrupt at a known step (the real signal path runs).
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
import time
from collections import deque

from transformers import TrainerCallback

from medgpt.errors import MedgptError

TEST_INTERRUPT_ENV = "MEDGPT_TEST_INTERRUPT_AT_STEP"


class TrainingDiverged(MedgptError):
    """The loss watchdog stopped training (a checkpoint was saved)."""


class InterruptGuard(TrainerCallback):
    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)
    REPEAT_S = 2.0  # a signal this soon after the first is the same request delivered twice

    def __init__(self):
        self.signum: int | None = None
        self._first_at: float | None = None
        self._previous: dict = {}
        self._test_step = int(os.environ.get(TEST_INTERRUPT_ENV, "0") or 0)

    def _handle(self, signum, frame):
        if self._first_at is not None:
            if time.monotonic() - self._first_at < self.REPEAT_S:
                return  # delivered twice (the launcher forwarded what SLURM also sent): one request
            raise KeyboardInterrupt  # asked again: stop now, without a checkpoint
        self.signum, self._first_at = signum, time.monotonic()
        print(f"\n{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, then stopping "
              f"(send it again, {self.REPEAT_S:g} s or more later, to stop at once)", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        if self._test_step and state.global_step == self._test_step and self.signum is None:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs before the next line (main thread)
        signum = _agreed_signal(self.signum, args) if getattr(args, "world_size", 1) > 1 else self.signum
        if signum is not None:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def _agreed_signal(signum: int | None, args) -> int | None:
    """The signal any rank has seen (the highest number), on every rank: all of them stop after the same step."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return signum
    seen = torch.tensor([signum or 0], dtype=torch.int64, device=args.device)
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return int(seen.item()) or None


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
