"""The one family of user-facing errors.

Every mistake a user can fix (a bad option, a missing file, a checkpoint of another run, a
diverging loss) raises a subclass of ``UserError`` with one line that says what is wrong and
what to do. The entry points catch ``UserError`` alone and print that line with exit code 1
(``--debug`` shows the traceback); anything else is a bug and keeps its traceback.

The subclasses also derive from the built-in type they were before (``ValueError``,
``RuntimeError``), so code that catches those keeps working."""


class UserError(Exception):
    """A problem the user can fix; the message is one line that says what to do."""


class RunError(UserError, RuntimeError):
    """A problem with a run's inputs or files (data root, checkpoints, folders)."""


class OptionError(UserError, ValueError):
    """An impossible or contradictory command line; the message says what to do (raised by
    ``argparser`` and by the methods' option checks)."""
