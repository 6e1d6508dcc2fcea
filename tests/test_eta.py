"""The ETA of a sequence of steps (issue 28, row 14): the estimate of utils/eta.py and the
bar's figures, from times fed in (no clock). Expected values are worked out by hand from the
rule: later steps have as many iterations per new class as the current one."""
import pytest

import tasks
from train import step_speed
from utils import eta


def test_new_classes_leave_out_the_background_of_step_0():
    per_step = tasks.get_per_task_classes("voc", "15-5s", 5)     # 15-1: 16, then 1 a step
    assert eta.new_classes(per_step) == [15, 1, 1, 1, 1, 1]


def test_share_of_the_later_steps():
    added = [15, 1, 1, 1, 1, 1]
    assert eta.later_steps_share(added, 0, range(6)) == pytest.approx(5 / 15)
    assert eta.later_steps_share(added, 2, range(6)) == pytest.approx(3.0)
    # only the steps of the command line count: 0,1,2 leaves out 3..5
    assert eta.later_steps_share(added, 0, [0, 1, 2]) == pytest.approx(2 / 15)
    assert eta.later_steps_share(added, 5, range(6)) is None      # the last step
    assert eta.later_steps_share([10, 5], 0, [0]) is None         # one step given


def test_sequence_left_adds_whole_later_steps():
    # 3 of a step's 10 epochs left; later steps twice the current one: 3 + 2 * 10
    assert eta.sequence_left(3, 10, 2.0) == 23


def test_bar_figures_from_fed_in_times():
    # 10 iterations of 4 images in 20 s: 2 s an iteration, 0.5 s an image
    speed = step_speed(images=40, seconds=20.0, iterations_done=10, iterations_left=90)
    assert speed == {"img/s": "2.0", "step ETA": "03:00"}
    # the step has 100 iterations; later steps a third of it: (90 + 100 / 3) * 2 s
    speed = step_speed(images=40, seconds=20.0, iterations_done=10, iterations_left=90,
                       step_iterations=100, later_share=1 / 3)
    assert speed["step ETA"] == "03:00"
    assert speed["all ETA"] == "~04:06"
