"""RCIL (Representation Compensation Networks, CVPR 2022): twin branches beside the 3x3
convs, folded into one frozen conv at every step > 0, a pooled cube distillation in place of
PLOP's POD, MiB's unbiased losses with 100 x UNKD (docs/behaviour.md §18).

The numerical core:

* :mod:`methods.rcil.branches`: the twin branches and their mixing rule (the network change);
* :mod:`methods.rcil.fold`: folding the two branches into one frozen conv between steps;
* :mod:`methods.rcil.cube`: the pooled cube distillation;
* :mod:`methods.rcil.loss`: RCIL's loss at step > 0 and its classifier initialisation.

This module declares the method: its options (own names where RCIL reuses PLOP's or MiB's,
so that neither switches on another family's part), preset and parts. The lifecycle:

* ``network``: every network of a step (train, old, final) gets the twins after its
  ImageNet load (RCIL copies ``conv2``/``bn2`` into the twin), and the zero fold biases a
  folded checkpoint carries: the new and the final network at step > 0, the old one at
  step >= 2;
* ``before_step`` (after the engine's non-strict load into the new network and strict load
  into the old one): the classifier initialisation (weights only), then the fold; the old
  network stays unfolded;
* ``optimizer_groups``: the folded, frozen parts are left out;
* ``train_mode``: the folded parts back to eval after every ``model.train()`` (RC25);
* the cube distillation as a term after MiB's unbiased KD: main + 100 x UNKD + cube, the sum
  of ``rcil_loss``.
"""
import torch

from utils.errors import OptionError

from ..base import Method, Part, Term
from .branches import add_twin_branches, twin_layers
from .cube import CUBE_FACTORS, cube_distillation
from .fold import (
    RCIL_ASPP_WIDTH,
    add_fold_biases,
    fold_twin_branches,
    folded_parts,
    refreeze_folded,
)
from .loss import init_new_classifier_weights

__all__ = ["METHODS", "TwinBranches", "ClassifierWeightsInit", "CubeDistillation", "parts"]

METHODS = (Method("RCIL", {"rcil_branches": True, "rcil_cube": True,
                           "rcil_cube_logits": "small", "loss_kd": 100, "unce": True,
                           "unkd": True, "rcil_init_balanced": True,
                           "classif_adaptive_factor": True},
                  "twin branches folded between steps + UNCE + 100 x UNKD + cube distillation"),)

# the fix of each quirk that changes numbers (docs/behaviour.md §18, R.7)
FIX_OPTIONS = {
    "rcil_stem_activation": "RC1: a leaky-ReLU after the stem's norm",
    "rcil_linear_norms": "RC2: every norm variant linear, the fold with the norm's own scale",
    "rcil_private_rng": "RC4: the branch draws from a private generator (seeded by "
                        "--random_seed and the step), not the global one",
    "rcil_reinit_twin": "RC7: the twin set to the folded conv, so a step starts equal to the "
                        "old network",
    "rcil_exact_reload": "RC8: the folded norms keep eps 0 when a folded checkpoint is loaded",
    "rcil_aspp_width_slices": "RC9: the head fold slices map_bn by the head's width, not 256",
    "rcil_cube_in_epoch_loss": "RC17: the epoch loss statistics include the cube terms",
}
FINGERPRINT_KEYS = ("rcil_branches", "rcil_cube", "rcil_cube_logits",
                    "rcil_init_balanced") + tuple(FIX_OPTIONS)
CUBE_LOGITS = ("none", "small", "large")


def add_arguments(parser):
    g = parser.add_argument_group("RCIL (its own names for what RCIL's code calls --pod, "
                                  "--pod_logits and --init_balanced)")
    g.add_argument("--rcil_branches", action="store_true", default=False,
                   help="RCIL's network: a twin beside every branched 3x3 conv and the ASPP "
                        "convs, folded into one frozen conv at every step > 0")
    g.add_argument("--rcil_cube", action="store_true", default=False,
                   help="the pooled cube distillation at step > 0 (RCIL's --pod, a switch)")
    g.add_argument("--rcil_cube_logits", choices=CUBE_LOGITS, default="none",
                   help="the last distilled map: the logits before upsampling (small, RCIL's "
                        "--pod_logits) or after (large, --pod_large_logits)")
    g.add_argument("--rcil_init_balanced", action="store_true", default=False,
                   help="new classifier weights := the background row (weights only; "
                        "--init_balanced is MiB's, which also shifts the biases)")
    for option, what in FIX_OPTIONS.items():
        g.add_argument(f"--{option}", action="store_true", default=False, help=f"[fix] {what}")


def check_options(opts, explicit):
    warnings = []
    if opts.rcil_cube and opts.dataset not in CUBE_FACTORS:
        raise OptionError(f"--rcil_cube has factors only for the datasets "
                          f"{', '.join(CUBE_FACTORS)}, not '{opts.dataset}' (RC12); drop "
                          "--rcil_cube or --method RCIL")
    if opts.rcil_cube_logits != "none" and not opts.rcil_cube:
        warnings.append("--rcil_cube_logits has no effect without --rcil_cube")
    network_fixes = ("rcil_stem_activation", "rcil_linear_norms", "rcil_private_rng",
                     "rcil_reinit_twin", "rcil_exact_reload", "rcil_aspp_width_slices")
    for option in network_fixes:
        if getattr(opts, option) and not opts.rcil_branches:
            warnings.append(f"--{option} has no effect without --rcil_branches")
    if opts.rcil_cube_in_epoch_loss and not opts.rcil_cube:
        warnings.append("--rcil_cube_in_epoch_loss has no effect without --rcil_cube")
    if opts.rcil_init_balanced and opts.init_balanced:
        warnings.append("--rcil_init_balanced and --init_balanced both initialise the new "
                        "classifier; MiB's runs first, RCIL's then overwrites the weights")
    return warnings


class ClassifierWeightsInit(Part):
    """``--rcil_init_balanced`` at step > 0: every row of the newest classifier's weight :=
    the background row, the biases as built (RC13). Runs before the fold (RCIL's order)."""
    name = "rcil_init"

    def before_step(self, step):
        init_new_classifier_weights(step.model)


class TwinBranches(Part):
    """``--rcil_branches``: the network change at every step, the fold at step > 0."""
    name = "rcil_branches"
    reads = ("rcil_stem_activation", "rcil_linear_norms", "rcil_private_rng",
             "rcil_reinit_twin", "rcil_exact_reload", "rcil_aspp_width_slices")

    def __init__(self, info):
        super().__init__(info)
        self.generator = None
        if info.opts.rcil_private_rng:
            self.generator = torch.Generator().manual_seed(
                int(info.opts.random_seed) * 1000 + info.step)
            # a key of the resume state only with the fix: other runs' checkpoints unchanged
            self.state_key = "rcil_rng"

    def network(self, net, role):
        opts, step = self.info.opts, self.info.step
        add_twin_branches(net, generator=self.generator,
                          stem_activation=opts.rcil_stem_activation,
                          linear_norms=opts.rcil_linear_norms)
        # a folded checkpoint (of any step >= 1) carries the main convs' biases
        loads_folded = step >= 2 if role == "old" else step >= 1
        if loads_folded:
            add_fold_biases(net)
            if opts.rcil_exact_reload:   # fix of RC8: the identity norms' eps 0 kept
                self._zero_folded_eps(net, mark_folded=role != "train")
        return net

    @staticmethod
    def _zero_folded_eps(net, mark_folded):
        for layer in twin_layers(net):
            norm = layer.branches[0][1] if hasattr(layer, "branches") else layer.map_bn
            norm.eps = 0.0
            layer.folded = layer.folded or mark_folded

    def before_step(self, step):
        if self.info.step == 0:
            return
        opts = self.info.opts
        fold_twin_branches(step.model, reinit_twin=opts.rcil_reinit_twin,
                           exact_scale=opts.rcil_linear_norms,
                           aspp_width=None if opts.rcil_aspp_width_slices else RCIL_ASPP_WIDTH)

    def optimizer_groups(self, groups, model):
        _, frozen = folded_parts(model)
        frozen = {id(p) for p in frozen}
        return [dict(g, params=[p for p in g["params"] if id(p) not in frozen])
                for g in groups]

    def train_mode(self, model):
        refreeze_folded(model)

    def full_state(self):
        # the private generator's place: an exact resume draws what the run would have drawn
        return None if self.generator is None else {"generator": self.generator.get_state()}

    def load_full_state(self, state):
        if self.generator is not None and state:
            self.generator.set_state(state["generator"])


class CubeDistillation(Term):
    """``--rcil_cube`` at step > 0: the spatial and channel cube terms on the attentions
    (after the activation with the twin network, RC15), the head output and the map of
    ``--rcil_cube_logits``; weight 1 (its factors are inside); out of the epoch loss
    statistics as in RCIL (RC17) unless ``--rcil_cube_in_epoch_loss``."""
    name = "cube"
    needs_old = True
    features = frozenset({"attentions", "sem_logits_small"})
    in_validation = False
    reads = ("rcil_cube_logits", "dataset")

    def __init__(self, info):
        super().__init__(info)
        self.in_epoch_loss = info.opts.rcil_cube_in_epoch_loss

    def _maps(self, outputs, features):
        maps = list(features["attentions"])
        if self.info.opts.rcil_cube_logits == "small":
            maps.append(features["sem_logits_small"])
        elif self.info.opts.rcil_cube_logits == "large":
            maps.append(outputs)
        return maps

    def __call__(self, batch):
        info = self.info
        spatial, channel = cube_distillation(
            self._maps(batch.outputs_old, batch.features_old),
            self._maps(batch.outputs, batch.features),
            index_new_class=info.n_old, nb_current_classes=info.n_classes,
            nb_new_classes=info.classes[-1], dataset=info.opts.dataset)
        return spatial + channel


def parts(info):
    opts, later = info.opts, info.step > 0
    found = []
    if later and opts.rcil_init_balanced:
        found.append(ClassifierWeightsInit(info))
    if opts.rcil_branches:
        found.append(TwinBranches(info))
    if later and opts.rcil_cube:
        found.append(CubeDistillation(info))
    return found
