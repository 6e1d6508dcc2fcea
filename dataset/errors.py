"""Errors of the data layer. Each carries one line that says what is wrong and what to do."""


class DatasetError(RuntimeError):
    """Base class: the data cannot be used as asked (the entry point prints the message)."""


class DatasetLayoutError(DatasetError):
    """A dataset folder, split file, or a file named by a split is missing or malformed."""


class CorruptFileError(DatasetError):
    """An image or mask exists but cannot be decoded."""


class IndexListError(DatasetError):
    """A cached index list cannot be read or does not fit the split it is used with."""


def one_line(exc):
    """The message of ``exc`` as one line.

    An error raised in a DataLoader worker reaches the main process with the worker's
    traceback as its message; its last line is the original message.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    last = lines[-1]
    prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
    for p in (prefix, f"{type(exc).__name__}: "):
        if last.startswith(p):
            return last[len(p):]
    return last
