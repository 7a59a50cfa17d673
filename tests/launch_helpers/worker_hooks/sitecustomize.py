"""Test hooks for the torchrun workers of a real `python launch.py ... launcher=torchrun` run (tests/test_distributed.py).

Python imports `sitecustomize` at start-up from the first folder of the path that has one; the tests put this folder on
PYTHONPATH only in the environment of the run under test, so the launch.py parent, torchrun and every rank import it,
and it acts only in the workers (RANK set) that an environment variable names, through a Trainer callback added to
every Trainer they create:

    MEDGPT_TEST_FAIL_RANK=<r>      rank r raises RuntimeError("rank r failed on purpose after step s") at the end of
    MEDGPT_TEST_FAIL_AT_STEP=<s>   optimiser step s (default 1)
    MEDGPT_TEST_STEP_DELAY_S=<x>   every rank sleeps x seconds after each optimiser step (a run slow enough to signal
                                   from outside at a known point)
"""

import os

FAIL_RANK, FAIL_STEP, STEP_DELAY = "MEDGPT_TEST_FAIL_RANK", "MEDGPT_TEST_FAIL_AT_STEP", "MEDGPT_TEST_STEP_DELAY_S"

_rank = os.environ.get("RANK")
_fails = _rank is not None and os.environ.get(FAIL_RANK) == _rank
_delay = float(os.environ.get(STEP_DELAY, "0") or 0) if _rank is not None else 0.0

if _fails or _delay > 0:
    import time

    import transformers

    class WorkerHook(transformers.TrainerCallback):
        def __init__(self):
            self.fail_at = int(os.environ.get(FAIL_STEP, "1")) if _fails else None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.fail_at:
                raise RuntimeError(f"rank {_rank} failed on purpose after step {self.fail_at}")
            if _delay:
                time.sleep(_delay)

    _init = transformers.Trainer.__init__

    def __init__(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        self.add_callback(WorkerHook())

    transformers.Trainer.__init__ = __init__
