"""The run logger: one TensorBoard event file per writer, tags with the step suffix."""
import types

import tensorboardX.event_file_writer as event_file_writer

from tb_events import scalars
from utils.logger import Logger


def test_two_steps_whose_writers_start_in_the_same_second_keep_both_logs(tmp_path,
                                                                          monkeypatch):
    # tensorboardX names an event file by the second it was opened: freeze that clock
    frozen = types.SimpleNamespace(time=lambda: 1_700_000_000.0)
    monkeypatch.setattr(event_file_writer, "time", frozen)
    for step in (0, 1):
        logger = Logger(str(tmp_path), rank=0, step=step, log_file=False)
        logger.add_scalar("E-Loss-reg", 0.5 + step, 0)
        logger.close()
    assert scalars(tmp_path, "E-Loss-reg/0") == [(0, 0.5)]
    assert scalars(tmp_path, "E-Loss-reg/1") == [(0, 1.5)]


def test_the_same_step_logged_twice_in_one_second_keeps_both_runs(tmp_path, monkeypatch):
    frozen = types.SimpleNamespace(time=lambda: 1_700_000_000.0)
    monkeypatch.setattr(event_file_writer, "time", frozen)
    for value in (1.0, 2.0):      # e.g. an interrupted run and its resume
        logger = Logger(str(tmp_path), rank=0, step=3, log_file=False)
        logger.add_scalar("Loss", value, int(value))
        logger.close()
    assert sorted(scalars(tmp_path, "Loss/3")) == [(1, 1.0), (2, 2.0)]


def test_other_ranks_write_no_event_file(tmp_path):
    logger = Logger(str(tmp_path), rank=1, step=0, log_file=False)
    logger.add_scalar("Loss", 1.0, 0)
    logger.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))
