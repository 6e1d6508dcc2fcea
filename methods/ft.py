"""FT: fine-tuning with the plain cross-entropy, the main loss every method starts from."""
from utils.loss import PixelCrossEntropy

from .base import MainLoss, Method

METHODS = (Method("FT", {}, "fine-tuning: cross-entropy only"),)


class CrossEntropy(MainLoss):
    """Cross-entropy with ignore index 255 (docs/behaviour.md §8.2)."""
    name = "ce"
    priority = 0

    def __init__(self, info):
        super().__init__(info)
        self.criterion = PixelCrossEntropy(ignore_index=255, reduction="none")

    def per_pixel(self, batch):
        return self.criterion(batch.outputs, batch.labels)


def parts(info):
    return [CrossEntropy(info)]
