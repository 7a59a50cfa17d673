"""User-facing errors: each carries one sentence that says what is wrong and what to do next.

`medgpt.run` catches `MedgptError`, prints its message (no traceback unless HYDRA_FULL_ERROR=1),
marks the run directory's summary.json as failed and exits non-zero.
"""

import signal


class MedgptError(Exception):
    """Base class for errors whose message is meant for the user as it is."""


class ConfigError(MedgptError):
    """A configuration value or combination that cannot work."""


class DataError(MedgptError):
    """Bad input data; the message names the file, the line and the field."""


class ModelError(MedgptError):
    """A model that cannot be found or loaded."""


class ArtefactError(MedgptError):
    """A trained model that could not be written where it belongs (the message says where it went instead)."""


class RunInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint (not an error: the run can be resumed).

    It lives here, not beside the interrupt guard, so that run.py can catch it without importing torch.
    """

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}")
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
