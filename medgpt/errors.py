"""User-facing errors: each carries one sentence that says what is wrong and what to do next.

`medgpt.run` catches `MedgptError`, prints its message (no traceback unless HYDRA_FULL_ERROR=1),
marks the run directory's summary.json as failed and exits non-zero.
"""


class MedgptError(Exception):
    """Base class for errors whose message is meant for the user as it is."""


class ConfigError(MedgptError):
    """A configuration value or combination that cannot work."""


class DataError(MedgptError):
    """Bad input data; the message names the file, the line and the field."""


class ModelError(MedgptError):
    """A model that cannot be found or loaded."""
