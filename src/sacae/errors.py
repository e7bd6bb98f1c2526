"""The exceptions the command line turns into one sentence on stderr and a documented exit status."""


class SacaeError(Exception):
    """A problem the user can fix (bad flag, unknown task, unwritable folder, ...).

    The message is one sentence meant for a person; the CLI prints it on stderr and exits with status 2.
    """

    exit_code = 2


class NumericalError(SacaeError):
    """A loss or parameter became NaN or infinite: the run stops, keeping its last good checkpoint."""

    exit_code = 3


class RunStopped(Exception):  # noqa: N818 (a stop, not an error)
    """The run was asked to stop by a signal and wrote a checkpoint; running the same command resumes it.

    The exit status is 128 + the signal's number, as a shell reports a process ended by that signal.
    """

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum
