"""The CUDA way of counting the confusion matrix (no host sync per batch: a scatter into a
known number of bins, the out-of-range check deferred to the reading), run on the CPU by
forcing its choice: the same matrix as torch.bincount, and a bad prediction still refused,
when the figures are read."""
import numpy as np
import pytest
import torch
from test_metrics import MATRIX, batch_for

from metrics import stream_metrics
from metrics.stream_metrics import MetricsError, StreamSegMetrics


@pytest.fixture
def device_counting(monkeypatch):
    monkeypatch.setattr(stream_metrics, "_count_without_sync", lambda index: True)


def test_the_same_matrix_as_bincount(device_counting):
    labels, preds = batch_for(MATRIX)
    metrics = StreamSegMetrics(4)
    for i in range(labels.shape[0]):
        metrics.update(labels[i:i + 1], preds[i:i + 1])
    np.testing.assert_array_equal(metrics.confusion_matrix, MATRIX)
    assert metrics.get_results(figure=False)["Total samples"] == labels.shape[0]


def test_a_prediction_outside_the_classes_is_refused_when_read(device_counting):
    metrics = StreamSegMetrics(4)
    metrics.update(np.zeros((1, 2, 2), int), np.full((1, 2, 2), 4))   # no sync: not yet
    with pytest.raises(MetricsError, match=r"\[0, 4\); 4 pixels are outside"):
        metrics.get_results(figure=False)
    with pytest.raises(MetricsError, match="outside"):
        metrics.synch(torch.device("cpu"))
    metrics.reset()
    metrics.update(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), int))
    assert metrics.get_results(figure=False)["Overall Acc"] == pytest.approx(1.0)
