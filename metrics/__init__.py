"""Segmentation metrics: the streaming confusion matrix (``StreamSegMetrics``) and the
old / new / all summaries of an incremental step (``metrics.summaries``)."""
from .stream_metrics import StreamSegMetrics  # noqa: F401
from .summaries import BACKGROUND_CONVENTION, summarize_iou  # noqa: F401
