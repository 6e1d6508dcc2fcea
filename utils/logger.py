"""Text log (stderr and a file in the log dir) and TensorBoard (tensorboardX), rank 0 only.

Every TensorBoard tag gets the suffix ``/<step>`` as in the original (``Loss/1``,
``Val_MeanIoU/1``), so all steps of a sequence share one log dir; a re-test (``--test``) adds
the prefix ``Retest_`` (``Retest_T_MeanIoU/1``), so its figures do not double the training
run's. The text log goes to log.txt only once the step's work starts (``keep``)."""
import contextlib
import logging
import logging.handlers
import os
import sys
import uuid

from tqdm.contrib.logging import logging_redirect_tqdm

# Loggers of the project's packages (index lists, data scans, ...) go to the same place.
PROJECT_LOGGERS = ("dataset", "modules", "metrics", "utils", "segmentation_module", "train",
                   "methods", "engine")


class Logger:
    def __init__(self, logdir, rank, debug=False, summary=True, step=None, log_file=True,
                 hold_file=False, tag_prefix=""):
        self.logdir = logdir
        self.rank = rank
        self.is_main = rank == 0
        self.debug_flag = debug
        self.step = step
        self.tag_prefix = tag_prefix    # "Retest_" for --test: beside the training run's tags
        self._writer = None
        self._log = logging.getLogger(f"mib.rank{rank}")
        self._log.handlers.clear()
        self._log.propagate = False
        self._log.setLevel(logging.DEBUG if debug else logging.INFO)
        fmt = logging.Formatter(f"%(levelname)s:rank{rank}: %(message)s")
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        self._log.addHandler(handler)
        self._file = None
        self._summary_suffix = None
        if self.is_main:
            os.makedirs(logdir, exist_ok=True)
            if log_file:
                # held back until ``keep()``: a command that fails before its work starts
                # leaves no line in the run's log.txt (and no new file)
                fh = logging.FileHandler(os.path.join(logdir, "log.txt"), encoding="utf-8",
                                         delay=True)
                fh.setFormatter(logging.Formatter(
                    f"%(asctime)s %(levelname)s:rank{rank}: %(message)s"))
                self._file = logging.handlers.MemoryHandler(
                    capacity=1 << 30, flushLevel=logging.CRITICAL + 1, target=fh,
                    flushOnClose=False)
                self._log.addHandler(self._file)
            if summary:
                # tensorboardX names event files by the second: a writer of its own per
                # step and run, or a step that starts within the same second as the
                # previous one would replace the previous step's file
                self._summary_suffix = f".step{step}.{uuid.uuid4().hex[:8]}" \
                    if step is not None else f".{uuid.uuid4().hex[:8]}"
        # console lines go through tqdm.write, so that they never break a progress bar
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm([self._log]))
        self._kept = False
        if not hold_file:
            self.keep()
        # rank 0 shows the packages' messages with ours; other ranks stay quiet
        handlers = self._log.handlers if self.is_main else [logging.NullHandler()]
        self._routed = []
        for name in PROJECT_LOGGERS:
            routed = logging.getLogger(name)
            routed.setLevel(self._log.level)
            routed.propagate = False
            for h in handlers:
                routed.addHandler(h)
                self._routed.append((routed, h))

    # --- text -----------------------------------------------------------------------------
    def info(self, msg):
        if self.is_main:
            self._log.info(msg)

    def debug(self, msg):
        if self.is_main and self.debug_flag:
            self._log.debug(msg)

    def warning(self, msg):
        if self.is_main:
            self._log.warning(msg)

    def error(self, msg):
        """An error line for log.txt once the work started (the entry point prints it on
        stderr itself)."""
        if self.is_main and self._file is not None and self._kept:
            self._file.target.handle(self._log.makeRecord(
                self._log.name, logging.ERROR, "", 0, msg, None, None))

    def keep(self):
        """The step's work has started: write the held-back lines to log.txt, and every
        later line at once."""
        self._kept = True
        if self._file is not None:
            self._file.capacity = 1
            self._file.flush()

    @property
    def writer(self):
        """The TensorBoard writer, made at its first use (so a command that fails before
        logging anything leaves no event file)."""
        if self._writer is None and self._summary_suffix is not None:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(self.logdir, filename_suffix=self._summary_suffix)
        return self._writer

    # --- TensorBoard ----------------------------------------------------------------------
    def _tag(self, tag):
        tag = self.tag_prefix + tag
        return f"{tag}/{self.step}" if self.step is not None else tag

    def add_scalar(self, tag, value, step=None):
        if self.writer is not None:
            self.writer.add_scalar(self._tag(tag), float(value), step)

    def add_image(self, tag, image, step=None):
        """``image``: uint8 array or tensor, CHW."""
        if self.writer is not None:
            self.writer.add_image(self._tag(tag), image, step)

    def add_figure(self, tag, figure, step=None):
        if self.writer is not None:
            self.writer.add_figure(self._tag(tag), figure, step)  # closes the figure

    def add_table(self, tag, table, step=None):
        """A two-column HTML table (Term, Value) as a text entry."""
        if self.writer is not None:
            rows = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in table.items())
            html = f"<table width=\"100%\"><tr><th>Term</th><th>Value</th></tr>{rows}</table>"
            self.writer.add_text(self._tag(tag), html, step)

    def add_results(self, results, tag="Results"):
        """One HTML table: each row is a key followed by the values of its nested dict."""
        if self.writer is not None:
            rows = "".join("<tr><td>" + str(k) + "</td>" +
                           "".join(f"<td>{v}</td>" for v in row.values()) + "</tr>"
                           for k, row in results.items())
            self.writer.add_text(self._tag(tag), f"<table width=\"100%\">{rows}</table>")

    def flush(self):
        if self._writer is not None:
            self._writer.flush()

    def close(self):
        """Detach and close everything; lines held back (no ``keep()``) are dropped."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._summary_suffix = None
        self._redirect.close()
        if self._file is not None:
            self._file.buffer.clear()
            self._file.target.close()
        for routed, h in self._routed:
            routed.removeHandler(h)
        self._routed = []
        for h in list(self._log.handlers):
            h.close()
            self._log.removeHandler(h)
