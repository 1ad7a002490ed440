"""The one family of errors dsv3 raises for user mistakes.

The CLI catches `Dsv3Error`, prints its message on one line and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class Dsv3Error(Exception):
    """Base class: a user-facing problem whose message says what is wrong and what was expected."""


class ConfigError(Dsv3Error, ValueError):
    """A configuration field is missing, malformed or inconsistent."""


class CheckpointError(Dsv3Error):
    """A checkpoint directory, index, shard or tensor is missing or not what the config implies."""


class UsageError(Dsv3Error, ValueError):
    """A bad argument to a public function or command (prompt, sampling parameter, ...)."""


class ResourceError(Dsv3Error):
    """A model or cache would not fit in the memory the device has free (checked before allocating)."""


class Overloaded(Dsv3Error):
    """The server's queue is full (HTTP 429): nothing is wrong with the request, retry it later."""


class NumericalError(Dsv3Error):
    """The model produced NaN/Inf (non-finite weights, or an overflow): stop rather than emit garbage tokens."""


class DistributedError(Dsv3Error):
    """A rank of a parallel run failed; every rank raises this with the failing rank's message."""

    def __init__(self, message: str, rank: int = 0):
        super().__init__(message)
        self.rank = rank  # the rank raising it (only rank 0 needs to print it)


class Interrupted(KeyboardInterrupt):
    """A command stopped by a signal (SIGINT, SIGTERM, SIGHUP) after cleaning up what it had written.

    Not a user mistake, so not a `Dsv3Error`: the CLI prints the message on one line and exits 128 + signum,
    the shell's convention for a process ended by that signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
