"""Streaming segmentation metrics over a confusion matrix, as the original MiB code reports
them (same result keys, same formulas, ``'X'`` for classes absent from the ground truth)."""
import numpy as np
import torch
import torch.distributed as dist

from utils import distributed
from utils.errors import UserError

__all__ = ["StreamSegMetrics", "MetricsError"]

EPS = 1e-6
_PER_CLASS_KEYS = ("Class IoU", "Class Acc", "Confusion Matrix")


class MetricsError(UserError, ValueError):
    """The metrics were given labels or predictions they cannot count."""


def _as_long_tensor(x, device=None, what="labels"):
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if x.is_floating_point() or x.is_complex():
        raise MetricsError(f"{what} must be integer class indices (e.g. the argmax over "
                           f"channels), got dtype {x.dtype}")
    if device is not None:
        x = x.to(device)
    return x.long()


def _count_without_sync(index):
    """Count on the device, without a host sync per batch (CUDA); on the CPU a sync costs
    nothing and a bad prediction is reported at once."""
    return index.is_cuda


class StreamSegMetrics:
    """Confusion matrix M (n x n, float64, rows = ground truth, columns = prediction)
    accumulated over images; pixels whose label is outside [0, n) (e.g. 255) are skipped.

    The matrix lives on the device of the first update (a torch tensor), so CUDA batches are
    counted without leaving the GPU; ``confusion_matrix`` gives it as a NumPy array."""

    def __init__(self, n_classes):
        self.n_classes = int(n_classes)
        self._cm = None
        self._outside = None      # pixels predicted outside [0, n), on the device (CUDA)
        self.total_samples = 0

    # -- accumulation -----------------------------------------------------------------------
    @property
    def confusion_matrix(self):
        self._raise_if_outside()
        if self._cm is None:
            return np.zeros((self.n_classes, self.n_classes), dtype=np.float64)
        return self._cm.detach().cpu().numpy().copy()

    def update(self, label_trues, label_preds):
        """Add a batch: ground truth and predicted class indices, both B x H x W (NumPy
        arrays or torch tensors)."""
        device = next((x.device for x in (label_trues, label_preds)
                       if isinstance(x, torch.Tensor)), None)
        if self._cm is not None:
            device = self._cm.device
        trues = _as_long_tensor(label_trues, device, "ground-truth labels")
        preds = _as_long_tensor(label_preds, trues.device, "predictions")
        if trues.shape != preds.shape:
            raise MetricsError(f"ground truth {tuple(trues.shape)} and predictions "
                               f"{tuple(preds.shape)} differ in shape")
        n = self.n_classes
        valid = (trues >= 0) & (trues < n)
        bad_pred = valid & ((preds < 0) | (preds >= n))
        # skipped pixels go to bin n*n, impossible predictions to bin n*n+1
        index = torch.where(valid, n * trues + preds, torch.full_like(trues, n * n))
        index = torch.where(bad_pred, torch.full_like(index, n * n + 1), index)
        flat = index.flatten()
        if _count_without_sync(flat):
            # torch.bincount on CUDA reads the largest index back to the host; a scatter into
            # bins of a known number does not. The out-of-range check waits for the reading.
            counts = torch.zeros(n * n + 2, dtype=torch.long, device=flat.device)
            counts.index_add_(0, flat, torch.ones_like(flat))
            self._outside = counts[n * n + 1] + (0 if self._outside is None else self._outside)
        else:
            counts = torch.bincount(flat, minlength=n * n + 2)
            self._raise_if_outside(counts[n * n + 1])
        hist = counts[:n * n].view(n, n).to(torch.float64)
        if self._cm is None:
            self._cm = hist
        else:
            self._cm += hist
        self.total_samples += int(trues.shape[0])

    def _raise_if_outside(self, outside=None):
        """Predictions outside [0, n) are an error (counted on the device, read here)."""
        outside = self._outside if outside is None else outside
        if outside is not None and int(outside) > 0:
            raise MetricsError(f"predictions must be class indices in [0, {self.n_classes}); "
                               f"{int(outside)} pixels are outside")

    def reset(self):
        self._cm = None
        self._outside = None
        self.total_samples = 0

    def synch(self, device):
        """Sum the confusion matrix and the sample count of every process on rank 0 (other
        ranks keep their own). Nothing to do without a process group."""
        self._raise_if_outside()
        ctx = distributed.context()
        if not ctx.distributed:
            return
        backend = str(dist.get_backend())
        comm_device = torch.device("cpu") if backend == "gloo" else torch.device(device)
        n = self.n_classes
        cm = self._cm if self._cm is not None else torch.zeros(n, n, dtype=torch.float64)
        # one collective: the matrix and the sample count in one float64 buffer
        buf = torch.cat([cm.reshape(-1).to(comm_device),
                         torch.tensor([self.total_samples], dtype=torch.float64,
                                      device=comm_device)])
        dist.reduce(buf, dst=0)
        if ctx.is_main:
            keep = self._cm.device if self._cm is not None else comm_device
            self._cm = buf[:-1].reshape(n, n).to(keep)
            self.total_samples = int(buf[-1].item())

    # -- results ----------------------------------------------------------------------------
    def get_results(self, figure=True):
        """Every figure of the original (see the module doc); ``figure=False`` skips building
        the matplotlib figure (the ``'Confusion Matrix'`` key is then absent)."""
        hist = self.confusion_matrix
        with np.errstate(divide="ignore", invalid="ignore"):
            gt = hist.sum(axis=1)
            pred = hist.sum(axis=0)
            diag = np.diag(hist)
            total = hist.sum()
            present = gt != 0
            acc_c = diag / (gt + EPS)
            iou_c = diag / (gt + pred - diag + EPS)
            overall = diag.sum() / total
            freq = gt / total
            freqw = (freq[freq > 0] * iou_c[freq > 0]).sum()
        mean_acc = float(acc_c[present].mean()) if present.any() else float("nan")
        mean_iou = float(iou_c[present].mean()) if present.any() else float("nan")
        results = {
            "Total samples": self.total_samples,
            "Overall Acc": float(overall),
            "Mean Acc": mean_acc,
            "FreqW Acc": float(freqw),
            "Mean IoU": mean_iou,
            "Class IoU": {c: float(iou_c[c]) if present[c] else "X" for c in range(self.n_classes)},
            "Class Acc": {c: float(acc_c[c]) if present[c] else "X" for c in range(self.n_classes)},
        }
        if figure:
            results["Confusion Matrix"] = self.confusion_matrix_figure(hist)
        return results

    def confusion_matrix_figure(self, hist=None):
        """The row-normalised confusion matrix as a matplotlib figure (Agg canvas, not
        registered with pyplot, so it is freed when no longer referenced)."""
        from utils.figures import new_figure

        hist = self.confusion_matrix if hist is None else hist
        normalised = hist / (hist.sum(axis=1) + 1e-6)[:, np.newaxis]
        fig = new_figure()
        ax = fig.subplots()
        image = ax.imshow(normalised, interpolation="nearest", cmap="Blues")
        fig.colorbar(image, ax=ax)
        ax.set(title="Confusion Matrix", ylabel="True label", xlabel="Predicted label")
        fig.tight_layout()
        return fig

    @staticmethod
    def to_str(results):
        """Text report: every scalar as ``key: value``, then per-class IoU and accuracy."""
        lines = [""]
        for key, value in results.items():
            if key in _PER_CLASS_KEYS:
                continue
            lines.append(f"{key}: {value:f}" if isinstance(value, float) else f"{key}: {value}")
        for key in ("Class IoU", "Class Acc"):
            if key in results:
                lines.append(f"{key}:")
                lines.extend(f"\tclass {c}: {v}" for c, v in results[key].items())
        return "\n".join(lines) + "\n"
