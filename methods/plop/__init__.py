"""PLOP (Douillard et al., CVPR 2021): local POD distillation of the old model's feature maps
and logits, entropy-based pseudo-labels of the background, a per-image classification
factor, MiB's background initialisation, and plain cross-entropy (docs/behaviour.md §15).

The numerical core is in ``pod.py`` (``features_distillation``, ``_local_pod``,
``_local_pod_masked``, ``_global_pod``) and ``pseudo.py`` (``entropy``, ``find_median``,
``pseudo_label_targets``, ``classif_adaptive_factor``), with PLOP's names and keywords; this
module declares the method: its options, preset and parts.

Quirks P1-P17 are reproduced by default; each fix that changes numbers has an option
(``FIX_OPTIONS``). PLOP's protocol rules shared by every method of its code (P18-P20: label
remapping, test reloading, ImageNet key cut) are not part of the method: ``--protocol plop``
(an option of every method, in ``argparser.py``) selects them."""
import argparse
import json
import logging

from utils import distributed
from utils.errors import OptionError
from utils.option_range import Range

from ..base import Method, Part, Term
from .pod import PODError, _global_pod, _local_pod, _local_pod_masked, features_distillation
from .pseudo import (
    PSEUDO_MODES,
    PseudoLabelError,
    classif_adaptive_factor,
    entropy,
    find_median,
    pseudo_label_targets,
)

__all__ = ["features_distillation", "_local_pod", "_local_pod_masked", "_global_pod",
           "entropy", "find_median", "pseudo_label_targets", "classif_adaptive_factor",
           "PODError", "PseudoLabelError", "METHODS"]

log = logging.getLogger(__name__)

POD_OPTIONS_PRESET = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005,
                                           "type": "local"}}}
METHODS = (Method("PLOP", {"pod": "local", "pod_factor": 0.01, "pod_logits": True,
                           "pod_options": POD_OPTIONS_PRESET, "pseudo": "entropy",
                           "threshold": 0.001, "classif_adaptive_factor": True,
                           "init_balanced": True},
                  "CE on pseudo-labels x adaptive factor + local POD + background init"),)

# the fix of each quirk that changes numbers (docs/behaviour.md §15.9)
FIX_OPTIONS = {
    "entropy_normalized": "P1: the entropy normalised once, -sum p ln p / ln C_old",
    "true_median_thresholds": "P2-P4: the true median of each class's histogram",
    "pseudo_same_mask": "P6: the histogram over the pixels that are rewritten (y < C_old)",
    "sync_thresholds": "P7: histograms summed over processes before the thresholds",
    "classif_factor_bg_only": "P9: the factor weights background pixels only (1 without any)",
    "pod_per_axis_tiles": "P10: POD tiles sized by height and width separately",
    "pod_logits_logsumexp": "P11: the new logits collapsed by log-sum-exp, not a raw sum",
    "pod_options_per_map": "P13: --pod_options values do not carry over from map to map",
    "pod_in_epoch_loss": "P15: the epoch loss statistics include POD",
}
# parsed by PLOP but without any effect there (accepted, with a warning)
NO_EFFECT = {"pod_apply": "all", "pod_interpolate_last": False, "step_threshold": None}
# ablations of PLOP's paper that are not part of the method (refused with a clear line)
ABLATIONS = {"ce_on_pseudo": False, "pseudo_soft": None, "pseudo_soft_factor": 1.0,
             "pseudo_ablation": None}

FINGERPRINT_KEYS = ("pod", "pod_factor", "pod_options", "pod_prepro", "no_pod_schedule",
                    "pod_logits", "pod_large_logits", "spp_scales", "pod_deeplab_mask",
                    "pod_deeplab_mask_factor", "deeplab_mask_downscale", "pseudo", "threshold",
                    "pseudo_nb_bins", "classif_adaptive_factor",
                    "classif_adaptive_min_factor") + tuple(FIX_OPTIONS)


# numeric ranges of PLOP's options (checked by the command line, ``argparser.check_ranges``)
OPTION_RANGES = {"pod_factor": Range(0), "pod_deeplab_mask_factor": Range(0),
                 "spp_scales": Range(1), "threshold": Range(0, 1), "pseudo_nb_bins": Range(1),
                 "classif_adaptive_min_factor": Range(0, 1)}


def _json(value):
    try:
        return json.loads(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--pod_options is not valid JSON ({e}): {value!r}")


def add_arguments(parser):
    g = parser.add_argument_group("PLOP (names, types and defaults of PLOP's code)")
    g.add_argument("--pod", type=str, default=None, choices=["spatial", "local", "global"],
                   help="POD feature distillation at step > 0 and its collapse")
    g.add_argument("--pod_factor", type=float, default=5.0,
                   help="weight of every POD map unless --pod_options sets it")
    g.add_argument("--pod_options", type=_json, default=None,
                   help="per-map switches as JSON ({\"switch\": {\"before\": {...}, \"after\": "
                        "{...}}, ...}; docs/behaviour.md §15.4.5)")
    g.add_argument("--pod_prepro", type=str, default="pow", choices=["pow", "none", "relu"],
                   help="applied to every map before the pooling")
    g.add_argument("--no_pod_schedule", action="store_true", default=False,
                   help="drop the sqrt(C_cur / C_new) factor of POD")
    g.add_argument("--pod_logits", action="store_true", default=False,
                   help="distil the logits before upsampling as the last POD map")
    g.add_argument("--pod_large_logits", action="store_true", default=False,
                   help="distil the upsampled logits as the last POD map (without --pod_logits)")
    g.add_argument("--spp_scales", type=int, nargs="+", default=[1, 2, 4],
                   help="the pyramid scales of local POD")
    g.add_argument("--pod_deeplab_mask", action="store_true", default=False,
                   help="masked POD on the last map")
    g.add_argument("--pod_deeplab_mask_factor", type=float, default=None,
                   help="weight of the masked POD (default --pod_factor)")
    g.add_argument("--deeplab_mask_downscale", action="store_true", default=False,
                   help="masked POD: resize the mask to the maps instead of the maps to it")
    g.add_argument("--pod_apply", type=str, default="all", help="no effect (as in PLOP)")
    g.add_argument("--pod_interpolate_last", action="store_true", default=False,
                   help="no effect (as in PLOP)")
    g.add_argument("--pseudo", type=str, default=None,
                   help=f"pseudo-labels of the background at step > 0 ({', '.join(PSEUDO_MODES)})")
    g.add_argument("--threshold", type=float, default=0.9,
                   help="floor of the entropy thresholds of the classes")
    g.add_argument("--step_threshold", type=float, default=None, help="no effect (as in PLOP)")
    g.add_argument("--pseudo_nb_bins", type=int, default=None,
                   help="histogram bins of the thresholds (default 100)")
    g.add_argument("--classif_adaptive_factor", action="store_true", default=False,
                   help="weight each image's classification loss by its accepted fraction of "
                        "pseudo-labels")
    g.add_argument("--classif_adaptive_min_factor", type=float, default=0.0,
                   help="lower bound of that weight (0: none)")
    g.add_argument("--ce_on_pseudo", action="store_true", default=False,
                   help="ablation of PLOP's paper (not implemented here)")
    g.add_argument("--pseudo_soft", type=str, default=None,
                   help="ablation of PLOP's paper (not implemented here)")
    g.add_argument("--pseudo_soft_factor", type=float, default=1.0,
                   help="ablation of PLOP's paper (not implemented here)")
    g.add_argument("--pseudo_ablation", type=str, default=None,
                   help="ablation of PLOP's paper (not implemented here)")
    for option, what in FIX_OPTIONS.items():
        g.add_argument(f"--{option}", action="store_true", default=False, help=f"[fix] {what}")


def check_options(opts, explicit):
    warnings = []
    for option, default in NO_EFFECT.items():
        if option in explicit and getattr(opts, option) != default:
            warnings.append(f"--{option} is accepted but has no effect, as in PLOP's code")
    for option, default in ABLATIONS.items():
        if getattr(opts, option) != default:
            raise OptionError(f"--{option} is one of the ablations of PLOP's paper, which this "
                              "project does not implement; drop it")
    if opts.pseudo is not None:
        mode = pseudo_mode(opts)
        if mode not in PSEUDO_MODES:
            raise OptionError(f"--pseudo {opts.pseudo}: this project implements "
                              f"{', '.join(PSEUDO_MODES)} (PLOP uses entropy)")
        if mode != opts.pseudo:
            warnings.append(f"--pseudo {opts.pseudo}: the suffix after '_' has no effect, as "
                            f"in PLOP's code (P8); the mode is {mode}")
    if opts.pod_options is not None and not isinstance(opts.pod_options, dict):
        raise OptionError("--pod_options must be a JSON object ({...})")
    if opts.pod_large_logits and opts.pod_logits:
        warnings.append("--pod_large_logits has no effect with --pod_logits (the small logits "
                        "are the last POD map)")
    return warnings


def pseudo_mode(opts):
    """The mode of ``--pseudo``: PLOP parses ``<mode>_<t>`` but uses only the mode (P8)."""
    return opts.pseudo.split("_")[0]


class PseudoLabels(Part):
    """``--pseudo entropy`` at step > 0: the old model's confident predictions replace the
    background targets (old-class pixels too, P17), with per-class entropy thresholds
    computed once per step over the training loader (P7: on each process's own shard);
    ``--classif_adaptive_factor`` weights each image's loss by its accepted fraction."""
    name = "pseudo"
    needs_old = True
    in_validation = False

    def __init__(self, info):
        super().__init__(info)
        self.mode = pseudo_mode(info.opts)
        self.thresholds = None
        self.max_entropy = None

    def before_step(self, step):
        opts, info = self.info.opts, self.info
        if self.mode != "entropy":
            return                  # naive pseudo-labels need no thresholds
        sync = None
        if opts.sync_thresholds and info.world_size > 1:
            sync = distributed.all_reduce_sum
        self.thresholds, self.max_entropy = find_median(
            step.model_old, step.train_loader, step.device, info.n_classes, mode="entropy",
            threshold=opts.threshold, nb_bins=opts.pseudo_nb_bins, logger=None,
            autocast=step.autocast, same_mask=opts.pseudo_same_mask, n_old=info.n_old,
            true_median=opts.true_median_thresholds,
            normalized_entropy=opts.entropy_normalized, sync=sync)
        log.info(f"PLOP thresholds of step {info.step}: "
                 f"{[round(t, 6) for t in self.thresholds.tolist()]}")

    def rewrite_targets(self, batch):
        opts = self.info.opts
        pseudo = pseudo_label_targets(batch.labels, batch.outputs_old, self.thresholds,
                                      self.max_entropy, self.info.n_old, mode=self.mode,
                                      normalized_entropy=opts.entropy_normalized)
        batch.labels = pseudo.targets
        if opts.classif_adaptive_factor:
            factor = classif_adaptive_factor(pseudo.mask_background, pseudo.mask_valid,
                                             min_factor=opts.classif_adaptive_min_factor,
                                             bg_only=opts.classif_factor_bg_only)
            batch.pixel_weight = factor if factor.dim() == 3 else factor[:, None, None]


class LocalPOD(Term):
    """``--pod`` at step > 0: POD between the old and the new model's maps (the last block of
    each ResNet stage before its activation, the head output, and the logits with
    ``--pod_logits``), with the targets as rewritten by the pseudo-labels. Its weights are
    inside (``--pod_factor``, ``--pod_options``); left out of the epoch loss statistics as in
    PLOP (P15) unless ``--pod_in_epoch_loss``."""
    name = "pod"
    needs_old = True
    features = frozenset({"attentions", "sem_logits_small"})
    in_validation = False

    def __init__(self, info):
        super().__init__(info)
        self.in_epoch_loss = info.opts.pod_in_epoch_loss

    def _maps(self, outputs, features):
        maps = list(features["attentions"])
        if self.info.opts.pod_logits:
            maps.append(features["sem_logits_small"])
        elif self.info.opts.pod_large_logits:
            maps.append(outputs)
        return maps

    def __call__(self, batch):
        opts, info = self.info.opts, self.info
        return features_distillation(
            self._maps(batch.outputs_old, batch.features_old),
            self._maps(batch.outputs, batch.features),
            # normalize=False: PLOP's maps start unnormalised whatever the argument (P13), so
            # the per-map fix keeps that and changes only the carrying over
            collapse_channels=opts.pod, normalize=False, labels=batch.labels,
            index_new_class=info.n_old,
            pod_apply=opts.pod_apply, pod_deeplab_mask=opts.pod_deeplab_mask,
            pod_deeplab_mask_factor=opts.pod_deeplab_mask_factor,
            interpolate_last=opts.pod_interpolate_last, pod_factor=opts.pod_factor,
            prepro=opts.pod_prepro, deeplabmask_upscale=not opts.deeplab_mask_downscale,
            spp_scales=opts.spp_scales, pod_options=opts.pod_options or {},
            outputs_old=batch.outputs_old, use_pod_schedule=not opts.no_pod_schedule,
            nb_current_classes=info.n_classes, nb_new_classes=info.classes[-1],
            per_axis_tiles=opts.pod_per_axis_tiles,
            logits_logsumexp=opts.pod_logits_logsumexp,
            per_map_options=opts.pod_options_per_map)


def parts(info):
    opts = info.opts
    if info.step == 0:
        return []
    found = []
    if opts.pseudo is not None:
        found.append(PseudoLabels(info))
    if opts.pod is not None:
        found.append(LocalPOD(info))
    return found
