"""One DKD training iteration's loss, in DKD's order (docs/behaviour.md §19.6).

Step 0:   L = mbce * L_mbce + ac * L_ac
Step >= 1: L = mbce * L_mbce + kd * L_kd + dkd_pos * L_pos + dkd_neg * L_neg + ac * L_ac

with (channel c of the upsampled logits z; P, N the decomposed maps at stride 16; ° the old
model; every term a sum over its channels of per-channel means, D10):

* L_mbce on the last n_new channels, positives where the label is that class (D8, D9);
* L_kd on channels 1..n_old against sigmoid of the old model's channels 1..n_old;
* L_pos, L_neg on the first n_old channels of P and N against sigmoid of P°, N°;
* L_ac on channel 0 (the auxiliary classifier) against 0.

``dkd_losses`` works on given outputs; ``dkd_training_loss`` runs the networks first (the new
model with its decomposition, then the old one without gradients) and returns everything an
optimiser step and the logs need.
"""
from dataclasses import dataclass, field

import torch

from .losses import ac_map, kd_map, per_channel_mean, wbce_map

__all__ = ["DKDWeights", "DKDLosses", "dkd_losses", "dkd_training_loss", "TERM_NAMES"]

# the names DKD logs its terms under, in the order they add up
TERM_NAMES = ("loss_mbce", "loss_kd", "loss_dkd_pos", "loss_dkd_neg", "loss_ac")


@dataclass(frozen=True)
class DKDWeights:
    """DKD's ``hyperparameter`` block: the weight of each term and L_mbce's positive weight
    (DKD's defaults: VOC pos_weight 1, ADE 35; its step-0 VOC scripts pass 2)."""
    pos_weight: float = 1.0
    mbce: float = 1.0
    kd: float = 5.0
    dkd_pos: float = 5.0
    dkd_neg: float = 5.0
    ac: float = 1.0
    # fixes (off = DKD): ignore label 255 in L_mbce (D8); build its target in the logits'
    # dtype (D9)
    mbce_ignore_index: int = None
    mbce_target_in_logit_dtype: bool = False

    def factor(self, term):
        return {"loss_mbce": self.mbce, "loss_kd": self.kd, "loss_dkd_pos": self.dkd_pos,
                "loss_dkd_neg": self.dkd_neg, "loss_ac": self.ac}[term]


@dataclass
class DKDLosses:
    """``total``: what is optimised; ``per_channel[name]``: each term's per-channel means
    (their sum is the term); ``outputs``/``extras`` (and the old model's) as the networks
    returned them."""
    total: torch.Tensor
    per_channel: dict
    outputs: torch.Tensor = None
    extras: dict = field(default_factory=dict)
    outputs_old: torch.Tensor = None
    extras_old: dict = field(default_factory=dict)

    def term(self, name):
        return self.per_channel[name].sum()

    def logged(self):
        """What DKD logs per iteration: ``loss`` = the total, each term's mean over its
        channels (not the sum that is optimised)."""
        out = {"loss": float(self.total.detach())}
        out.update({k: float(v.detach().mean()) for k, v in self.per_channel.items()})
        return out


def dkd_losses(outputs, labels, n_old, n_new, weights, extras=None, outputs_old=None,
               extras_old=None):
    """The loss of one batch. ``outputs``: upsampled logits B x (1 + n_old + n_new) x H x W
    (channel 0 the auxiliary one); ``labels``: B x H x W; at step >= 1 (``n_old`` > 0)
    ``extras`` / ``extras_old`` hold the decomposed maps ``pos_reg`` / ``neg_reg`` of the new
    and the old model, and ``outputs_old`` the old model's upsampled logits."""
    if outputs.shape[1] != 1 + n_old + n_new:
        raise ValueError(f"the logits have {outputs.shape[1]} channels; 1 + {n_old} old + "
                         f"{n_new} new expected")
    mbce = wbce_map(outputs[:, outputs.shape[1] - n_new:], labels, n_old + 1,
                    pos_weight=weights.pos_weight, ignore_index=weights.mbce_ignore_index,
                    target_dtype=None if weights.mbce_target_in_logit_dtype else torch.float32)
    per_channel = {"loss_mbce": per_channel_mean(mbce)}
    if n_old > 0:
        if outputs_old is None or extras is None or extras_old is None:
            raise ValueError("a step >= 1 needs the old model's logits and both models' "
                             "decomposed maps (pos_reg, neg_reg)")
        per_channel["loss_kd"] = per_channel_mean(
            kd_map(outputs[:, 1:n_old + 1], outputs_old[:, 1:n_old + 1]))
        per_channel["loss_dkd_pos"] = per_channel_mean(
            kd_map(extras["pos_reg"][:, :n_old], extras_old["pos_reg"][:, :n_old]))
        per_channel["loss_dkd_neg"] = per_channel_mean(
            kd_map(extras["neg_reg"][:, :n_old], extras_old["neg_reg"][:, :n_old]))
    per_channel["loss_ac"] = per_channel_mean(ac_map(outputs[:, :1]))
    total = sum(weights.factor(name) * v.sum() for name, v in per_channel.items())
    return DKDLosses(total, per_channel)


def dkd_training_loss(model, model_old, images, labels, n_old, n_new, weights):
    """One iteration's forward passes and loss in DKD's order: at step >= 1 the new model
    first (with its decomposition), then the old model under no-grad (both deterministic
    there: BN and dropout frozen); at step 0 (``model_old`` None) the new model alone,
    without the decomposition."""
    incremental = model_old is not None
    outputs, extras = model(images, ret_intermediate=incremental)
    outputs_old, extras_old = None, {}
    if incremental:
        with torch.no_grad():
            outputs_old, extras_old = model_old(images, ret_intermediate=True)
    result = dkd_losses(outputs, labels, n_old, n_new, weights, extras=extras,
                        outputs_old=outputs_old, extras_old=extras_old)
    result.outputs, result.extras = outputs, extras
    result.outputs_old, result.extras_old = outputs_old, extras_old
    return result
