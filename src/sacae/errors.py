"""The one exception type that the command line turns into a single sentence and exit status 2."""


class SacaeError(Exception):
    """A problem the user can fix (bad flag, unknown task, unwritable folder, ...).

    The message is one sentence meant for a person; the CLI prints it on stderr and exits with status 2.
    """

    exit_code = 2
