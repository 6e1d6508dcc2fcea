"""StreamSegMetrics on a hand-made confusion matrix (4 classes, class 2 absent from the
ground truth but predicted), with ignored pixels, NumPy and torch inputs, and bad input."""
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from metrics import StreamSegMetrics
from metrics.stream_metrics import MetricsError

MATRIX = np.array([[50, 2, 3, 0],
                   [4, 20, 1, 0],
                   [0, 0, 0, 0],
                   [1, 0, 5, 14]], dtype=np.float64)


def batch_for(matrix, n_ignored=20, shape=(2, 6, 10), seed=0):
    """Labels and predictions (B x H x W) whose confusion matrix is ``matrix``, plus
    ``n_ignored`` pixels labelled 255 with arbitrary predictions."""
    rng = np.random.default_rng(seed)
    pairs = [(i, j) for i in range(matrix.shape[0]) for j in range(matrix.shape[1])
             for _ in range(int(matrix[i, j]))]
    pairs += [(255, int(rng.integers(0, matrix.shape[0]))) for _ in range(n_ignored)]
    assert len(pairs) == int(np.prod(shape))
    pairs = np.array(pairs)[rng.permutation(len(pairs))]
    return pairs[:, 0].reshape(shape), pairs[:, 1].reshape(shape)


def test_every_figure_of_the_worked_example():
    labels, preds = batch_for(MATRIX)
    metrics = StreamSegMetrics(4)
    metrics.update(labels, preds)
    np.testing.assert_array_equal(metrics.confusion_matrix, MATRIX)
    r = metrics.get_results()
    assert r["Total samples"] == 2
    assert r["Overall Acc"] == pytest.approx(0.84, abs=1e-12)
    assert r["Mean Acc"] == pytest.approx(0.8030302752, abs=1e-9)
    assert r["Mean IoU"] == pytest.approx(0.7580246659, abs=1e-9)
    assert r["FreqW Acc"] == pytest.approx(0.7835184970, abs=1e-9)
    for c, (iou, acc) in enumerate([(0.8333333194, 0.9090908926), (0.7407407133, 0.7999999680),
                                    (None, None), (0.6999999650, 0.6999999650)]):
        if iou is None:
            assert r["Class IoU"][c] == "X" and r["Class Acc"][c] == "X"
        else:
            assert r["Class IoU"][c] == pytest.approx(iou, abs=1e-9)
            assert r["Class Acc"][c] == pytest.approx(acc, abs=1e-9)


def test_confusion_matrix_figure():
    labels, preds = batch_for(MATRIX)
    metrics = StreamSegMetrics(4)
    metrics.update(labels, preds)
    fig = metrics.get_results()["Confusion Matrix"]
    assert isinstance(fig, Figure)
    ax, colorbar_ax = fig.axes
    assert ax.get_title() == "Confusion Matrix"
    assert ax.get_ylabel() == "True label" and ax.get_xlabel() == "Predicted label"
    image = ax.get_images()[0]
    assert image.get_cmap().name == "Blues" and image.get_interpolation() == "nearest"
    expected = MATRIX / (MATRIX.sum(1) + 1e-6)[:, None]
    np.testing.assert_allclose(np.asarray(image.get_array()), expected)
    fig.canvas.draw()                               # renders with the Agg canvas
    assert "Confusion Matrix" not in metrics.get_results(figure=False)


def test_numpy_and_torch_inputs_and_split_updates_agree():
    labels, preds = batch_for(MATRIX)
    whole = StreamSegMetrics(4)
    whole.update(torch.from_numpy(labels), torch.from_numpy(preds))
    split = StreamSegMetrics(4)
    split.update(labels[:1], preds[:1])
    split.update(torch.from_numpy(labels[1:]), preds[1:])     # mixed kinds
    np.testing.assert_array_equal(whole.confusion_matrix, MATRIX)
    np.testing.assert_array_equal(split.confusion_matrix, MATRIX)
    assert split.total_samples == 2
    assert split.get_results(figure=False) == whole.get_results(figure=False)


def test_ignored_and_out_of_range_labels_are_skipped():
    metrics = StreamSegMetrics(3)
    labels = np.array([[[0, 255, 7, -1, 2]]])
    preds = np.array([[[0, 1, 2, 0, 1]]])
    metrics.update(labels, preds)
    expected = np.zeros((3, 3))
    expected[0, 0] = expected[2, 1] = 1
    np.testing.assert_array_equal(metrics.confusion_matrix, expected)


def test_small_integer_labels_do_not_overflow():
    metrics = StreamSegMetrics(21)
    labels = np.full((1, 2, 2), 20, dtype=np.uint8)
    metrics.update(labels, labels.copy())
    assert metrics.confusion_matrix[20, 20] == 4 and metrics.confusion_matrix.sum() == 4


def test_reset_and_text_report():
    labels, preds = batch_for(MATRIX)
    metrics = StreamSegMetrics(4)
    metrics.update(labels, preds)
    text = metrics.to_str(metrics.get_results(figure=False))
    assert "Mean IoU: 0.758025" in text and "Total samples: 2" in text
    assert "Class IoU:" in text and "\tclass 2: X" in text and "Class Acc:" in text
    metrics.reset()
    assert metrics.total_samples == 0 and metrics.confusion_matrix.sum() == 0


def test_synch_without_process_group_changes_nothing():
    labels, preds = batch_for(MATRIX)
    metrics = StreamSegMetrics(4)
    metrics.update(labels, preds)
    metrics.synch(torch.device("cpu"))
    np.testing.assert_array_equal(metrics.confusion_matrix, MATRIX)
    assert metrics.total_samples == 2


@pytest.mark.parametrize("labels, preds, message", [
    (np.zeros((1, 2, 2), int), np.zeros((1, 2, 2), np.float32), "integer class indices"),
    (np.zeros((1, 2, 2), int), np.full((1, 2, 2), 4), r"\[0, 4\)"),
    (np.zeros((1, 2, 2), int), np.zeros((1, 2, 3), int), "shape"),
])
def test_bad_input_is_refused(labels, preds, message):
    with pytest.raises(MetricsError, match=message):
        StreamSegMetrics(4).update(labels, preds)


def test_empty_metrics_give_nan_without_warnings(recwarn):
    r = StreamSegMetrics(3).get_results(figure=False)
    assert np.isnan(r["Mean IoU"]) and np.isnan(r["Overall Acc"])
    assert all(v == "X" for v in r["Class IoU"].values())
    assert not recwarn.list
