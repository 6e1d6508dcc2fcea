"""RCIL's loss at step > 0 and its classifier initialisation (docs/behaviour.md, "RCIL",
§R.5).

    L = main + loss_kd * UNKD(z, z_old) + cube_spatial + cube_channel

main: MiB's unbiased cross-entropy (``unce``; plain cross-entropy otherwise), both per pixel
then the mean over ALL pixels (ignored ones count as 0); UNKD per pixel, mean over all pixels,
weight ``loss_kd`` (100 in RCIL's preset, RC24). The epoch statistics RCIL reports are
(main, loss_kd * UNKD): the cube terms are left out (RC17).
"""
from dataclasses import dataclass

import torch

from utils.loss import PixelCrossEntropy, UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss

from .cube import cube_distillation

__all__ = ["RCILLoss", "rcil_loss", "init_new_classifier_weights", "domain_labels"]


@dataclass
class RCILLoss:
    main: torch.Tensor
    kd: torch.Tensor           # already multiplied by loss_kd
    spatial: torch.Tensor
    channel: torch.Tensor
    main_per_pixel: torch.Tensor
    kd_per_pixel: torch.Tensor = None   # unweighted; None without UNKD

    @property
    def cube(self):
        return self.spatial + self.channel

    @property
    def total(self):
        return self.main + self.kd + self.cube

    def epoch_statistics(self, include_cube=False):
        """(class loss, regularisation loss) added to the epoch sums: RCIL leaves the cube
        terms out (RC17); ``include_cube`` adds them to the second value."""
        return self.main, self.kd + self.cube if include_cube else self.kd


def domain_labels(labels, nb_current_classes, ignore_index=255):
    """The cityscapes-domain trainer's labels: every valid label >= the class count -> 0."""
    out_of_range = (labels != ignore_index) & (labels >= nb_current_classes)
    return torch.where(out_of_range, torch.zeros_like(labels), labels)


def rcil_loss(outputs, outputs_old, labels, maps, maps_old, *, nb_old_classes, dataset,
              unce=True, loss_kd=100.0, unkd=True, nb_new_classes=None):
    """One iteration's loss at step > 0. ``maps``/``maps_old``: the distilled maps in order
    (the attentions a2..a5, the head output f, then the small logits with ``--pod_logits``).
    ``nb_new_classes`` defaults to C_cur - C_old (the domain trainer passes C_cur)."""
    n_cur = outputs.shape[1]
    if unce:
        main_map = UnbiasedCrossEntropy(old_cl=nb_old_classes, reduction="none")(outputs, labels)
    else:
        main_map = PixelCrossEntropy(reduction="none")(outputs, labels)
    main = main_map.mean()
    kd_map = None
    if unkd and loss_kd:
        kd_map = UnbiasedKnowledgeDistillationLoss(reduction="none")(outputs, outputs_old)
        kd = loss_kd * kd_map.mean()
    else:
        kd = main.new_zeros(())
    if nb_new_classes is None:
        nb_new_classes = n_cur - nb_old_classes
    spatial, channel = cube_distillation(
        maps_old, maps, index_new_class=nb_old_classes, nb_current_classes=n_cur,
        nb_new_classes=nb_new_classes, dataset=dataset)
    return RCILLoss(main, kd, spatial, channel, main_map, kd_map)


@torch.no_grad()
def init_new_classifier_weights(model):
    """RCIL's ``init_balanced`` (voc, ade): every row of the newest classifier's weight :=
    the background row of ``cls[0]``; the biases keep their values (RC13; MiB's init also
    shifts the biases)."""
    if len(model.cls) < 2:
        raise ValueError("init_new_classifier_weights needs a model with at least two steps")
    model.cls[-1].weight.copy_(model.cls[0].weight[0])
