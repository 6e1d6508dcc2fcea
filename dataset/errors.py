"""Errors of the data layer. Each carries one line that says what is wrong and what to do."""
from utils.errors import UserError


def _last_line(text, cls):
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    if not lines:
        return cls.__name__
    last = lines[-1]
    for prefix in (f"{cls.__module__}.{cls.__name__}: ", f"{cls.__name__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last


class DatasetError(UserError, RuntimeError):
    """Base class: the data cannot be used as asked (the entry point prints the message).

    A DataLoader re-raises a worker's exception in the main process with the worker's
    traceback as the message; such a message is cut back to its last line (the original
    message) and the full text is kept in ``worker_traceback``.
    """

    def __init__(self, message="", *args):
        text = str(message)
        self.worker_traceback = None
        if "Original Traceback" in text:
            self.worker_traceback = text
            text = _last_line(text, type(self))
        super().__init__(text, *args)


class DatasetLayoutError(DatasetError):
    """A dataset folder, split file, or a file named by a split is missing or malformed."""


class CorruptFileError(DatasetError):
    """An image or mask exists but cannot be decoded."""


class SizeMismatchError(DatasetError):
    """An image and its mask have different sizes."""


class IndexListError(DatasetError):
    """A cached index list cannot be read or does not fit the split it is used with."""


def one_line(exc):
    """The message of any exception as one line (the last line of a worker traceback)."""
    return _last_line(exc, type(exc))
