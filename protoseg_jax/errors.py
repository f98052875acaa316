"""User-facing errors and the process exit codes of `protoseg_jax.main`.

Every problem with the user's input (a file, a config key, a checkpoint, a command-line flag) raises a
`UserError` subclass whose message names the offending file, key or step; `main` prints it as one line and
exits with `EXIT_USER_ERROR`, without a traceback. Programming errors keep their traceback.
"""

from __future__ import annotations

# Exit codes (documented in the README; the launch scripts act on them).
EXIT_OK = 0
EXIT_USER_ERROR = 2        # bad input: a file, a config key, a flag, a checkpoint that does not fit
EXIT_NONFINITE = 3         # the loss became NaN/Inf: the run stopped, the last good checkpoint is kept
EXIT_SOME_FAILED = 4       # a batch job (slides) finished, but some of its inputs failed (each named)
EXIT_PREEMPTED = 75        # stopped early by SIGTERM/SIGINT after saving (EX_TEMPFAIL): rerun to resume


class UserError(ValueError):
  """An error in the user's input; printed as one line naming the file, key or step."""


class ConfigError(UserError):
  """A config value or key is wrong; the message names the key (`config.train.epochs`)."""


class DatasetError(UserError):
  """Bad or missing data; the message names the offending file or folder."""


class CheckpointError(UserError):
  """A checkpoint is missing, corrupt or does not fit the model; the message names the path or parameter."""


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or Inf; the message names the step. Exit code `EXIT_NONFINITE`."""
