"""RCIL's network change (docs/behaviour.md, "RCIL", §R.3): a trainable twin (conv + norm)
beside the 3x3 conv of every residual block and beside the four ASPP convs of the head,
mixed per channel by a random rule in training and averaged in evaluation.

``add_twin_branches(model)`` transforms a built ``IncrementalSegmentationModule`` in place
(the body's blocks and the head are replaced by twin-bearing modules holding the very same
submodules, so every existing state-dict key and value is kept) and returns the
:class:`BranchMixer` that draws the mixing weights. A network that is not transformed is the
plain MiB network.

Mixing rule, one draw per forward of every twin layer: ``r = rand(1, C, 1, 1)`` (float32) and

    r < 0.33: (w1, w2) = (2, 0);   0.33 <= r < 0.66: (0, 2);   r >= 0.66: (1, 1)
    m = 1/2 * w1 * branch1 + 1/2 * w2 * branch2

In eval mode the draw still happens (it moves the generator, RC4) and the weights are then
1, 1: the average of the two branches (RC10: evaluation always runs both).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.deeplab import DeeplabV3
from modules.norm import LEAKY_SLOPE, InPlaceABNSync, is_norm_layer
from modules.residual import ResidualBlock

__all__ = ["BranchMixer", "TwinResidualBlock", "TwinDeeplabV3", "add_twin_branches",
           "twin_layers", "branch_weights", "linearise_norms"]

# the two thresholds of the rule (probabilities 0.33 / 0.33 / 0.34, RC6)
LOW, HIGH = 0.33, 0.66
# RCIL's head convs are Xavier-normal with calculate_gain("leaky_relu", 1.0) = 1 (RC3)
RCIL_HEAD_SLOPE = 1.0


def branch_weights(r):
    """(w1, w2) of the rule for draws ``r`` (any shape), as float32 tensors."""
    two, zero, one = (r.new_full((), v) for v in (2.0, 0.0, 1.0))
    w1 = torch.where(r < LOW, two, torch.where(r < HIGH, zero, one))
    w2 = torch.where(r < LOW, zero, torch.where(r < HIGH, two, one))
    return w1, w2


class BranchMixer:
    """Draws the per-channel weights of every twin layer.

    ``generator=None`` (RCIL, RC4): the global CPU generator, so the draws of a run with the
    same seed and the same sequence of forwards equal RCIL's. A ``torch.Generator`` (the fix
    of RC4) keeps the draws out of the global stream. ``record`` (a list, or None) receives
    every draw, for tests and diagnostics."""

    def __init__(self, generator=None):
        self.generator = generator
        self.record = None

    def weights(self, channels, training, device, dtype=torch.float32):
        r = torch.rand(1, channels, 1, 1, dtype=torch.float32, generator=self.generator)
        if self.record is not None:
            self.record.append(r)
        if training:
            w1, w2 = branch_weights(r)
        else:  # drawn all the same, then overwritten: the plain average
            w1 = w2 = torch.ones_like(r)
        # 0, 1 and 2 are exact in every dtype: the branches' dtype changes no number
        return w1.to(device, dtype), w2.to(device, dtype)

    def mix(self, branch1, branch2, training):
        w1, w2 = self.weights(branch1.shape[1], training, branch1.device, branch1.dtype)
        return branch1 * w1 * 0.5 + branch2 * w2 * 0.5


def _leaky(x, inplace=False):
    return F.leaky_relu(x, negative_slope=LEAKY_SLOPE, inplace=inplace)


def _main_names(block):
    """(conv, norm) names of the block's branched 3x3 conv: ``conv2`` of a bottleneck; for a
    basic block (RCIL only builds bottlenecks) this project twins the first, strided 3x3
    conv ``conv1``, the one followed by an activation as in a bottleneck."""
    return ("conv2", "bn2") if block.bottleneck else ("conv1", "bn1")


class _TwinLayer:
    """State shared by the twin layers: ``folded`` after a fold (its main branch frozen),
    ``single_branch`` after :func:`methods.rcil.fold.collapse_for_inference`."""
    folded = False
    single_branch = False


class TwinResidualBlock(_TwinLayer, ResidualBlock):
    """A residual block whose 3x3 conv has a twin ``<conv>_new`` + ``<bn>_new`` (appended to
    ``convs``, so the keys are ``convs.conv2_new.weight``, ``convs.bn2_new.*``).

    Bottleneck: h = act(bn1(conv1(x))); m = mix(bn2(conv2(h)), bn2_new(conv2_new(h)));
    out = leaky(bn3(conv3(leaky(m))) + shortcut). Basic: m = mix of the two conv1 branches;
    out = leaky(bn2(conv2(leaky(m))) + shortcut). ``return_preact`` returns the output
    itself as the second value: RCIL's "attention" is post-activation (RC15)."""

    @classmethod
    def from_block(cls, block, mixer, copy_twin=True):
        twin = cls.__new__(cls)
        nn.Module.__init__(twin)
        twin._modules.update(block._modules)
        if block.proj_conv is None:   # a plain attribute, not a submodule
            twin.proj_conv = twin.proj_bn = None
        twin.out_channels = block.out_channels
        twin.bottleneck = hasattr(block.convs, "conv3")
        twin.mixer = mixer
        conv_name, bn_name = _main_names(twin)
        conv, bn = getattr(block.convs, conv_name), getattr(block.convs, bn_name)
        new_conv, new_bn = copy.deepcopy(conv), copy.deepcopy(bn)
        if not copy_twin:  # a fresh twin, as built before any weights are loaded
            new_conv.reset_parameters()
            with torch.no_grad():
                new_bn.weight.fill_(1)
                new_bn.bias.zero_()
                new_bn.running_mean.zero_()
                new_bn.running_var.fill_(1)
        twin.convs.add_module(conv_name + "_new", new_conv)
        twin.convs.add_module(bn_name + "_new", new_bn)
        return twin

    @property
    def branches(self):
        """((conv, norm) of the main branch, (conv, norm) of the twin)."""
        c, b = _main_names(self)
        convs = self.convs
        return ((getattr(convs, c), getattr(convs, b)),
                (getattr(convs, c + "_new"), getattr(convs, b + "_new")))

    def forward_parts(self, x):
        """(out, branch1, branch2, mix): the output and the two branch outputs before the mix."""
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        (conv, bn), (conv_new, bn_new) = self.branches
        c = self.convs
        h = _leaky(c.bn1(c.conv1(x))) if self.bottleneck else x
        b1 = bn(conv(h))
        if self.single_branch:   # collapsed for inference (fix of RC10): b1 is the average
            b2, m = None, b1
        else:
            b2 = bn_new(conv_new(h))
            m = self.mixer.mix(b1, b2, self.training)
        tail = (c.bn3(c.conv3(_leaky(m))) if self.bottleneck
                else c.bn2(c.conv2(_leaky(m))))
        out = _leaky(tail + shortcut, inplace=True)
        return out, b1, b2, m

    def forward(self, x, return_preact=False):
        out = self.forward_parts(x)[0]
        return (out, out) if return_preact else out


class TwinDeeplabV3(_TwinLayer, DeeplabV3):
    """The DeepLab-v3 head with a twin of the ASPP part (``map_convs_new``, ``map_bn_new``):

        a = map_bn(cat map_convs(x)),  a' = map_bn_new(cat map_convs_new(x))
        out = red_bn(red_conv(leaky(mix(a, a'))) + pool_red_conv(leaky(pool_bn(...)))),
        then leaky.

    One draw of 4 * hidden channels per forward."""

    @classmethod
    def from_head(cls, head, mixer, head_slope=RCIL_HEAD_SLOPE):
        twin = cls.__new__(cls)
        nn.Module.__init__(twin)
        twin._modules.update(head._modules)
        twin.pooling_size = head.pooling_size
        twin.mixer = mixer
        twin.map_convs_new = copy.deepcopy(head.map_convs)
        twin.map_bn_new = copy.deepcopy(head.map_bn)
        # every head conv drawn again with RCIL's gain; the twin independently of map_convs
        twin.reset_parameters("leaky_relu", head_slope)
        return twin

    @property
    def hidden_channels(self):
        return self.map_convs[0].out_channels

    def aspp_branches(self, x):
        a = self.map_bn(torch.cat([conv(x) for conv in self.map_convs], dim=1))
        a_new = self.map_bn_new(torch.cat([conv(x) for conv in self.map_convs_new], dim=1))
        return a, a_new

    def forward(self, x):
        if self.single_branch:   # collapsed for inference (fix of RC10)
            m = self.map_bn(torch.cat([conv(x) for conv in self.map_convs], dim=1))
        else:
            a, a_new = self.aspp_branches(x)
            m = self.mixer.mix(a, a_new, self.training)
        out = self.red_conv(_leaky(m))
        pool = self._global_pooling(x)
        pool = self.pool_red_conv(_leaky(self.global_pooling_bn(self.global_pooling_conv(pool))))
        if pool.shape[2:] != out.shape[2:]:
            pool = pool.expand(-1, -1, out.shape[2], out.shape[3])
        return _leaky(self.red_bn(out + pool), inplace=True)


def _is_sync_norm(layer):
    return isinstance(layer, InPlaceABNSync) or "Sync" in type(layer).__name__


def linearise_norms(model, *, keep=(), linear_norms=False):
    """RC1: RCIL builds every ``iabn_sync`` layer with slope 1 (linear) and re-applies the
    activations itself, except after the stem's bn1. RC2: ``iabn``/``abn`` keep slope 0.01,
    so their activations are applied twice; ``linear_norms`` makes every variant linear."""
    for module in model.modules():
        if not is_norm_layer(module) or not hasattr(module, "activation"):
            continue
        if any(module is k for k in keep):
            continue  # fix of RC1: the stem keeps its activation
        if linear_norms or _is_sync_norm(module):
            module.activation = "identity"


def twin_layers(model):
    """Every twin-bearing module of ``model`` in forward (= draw) order."""
    return [m for m in model.modules() if isinstance(m, (TwinResidualBlock, TwinDeeplabV3))]


def add_twin_branches(model, *, generator=None, copy_twin=True, stem_activation=False,
                      linear_norms=False, head_slope=RCIL_HEAD_SLOPE):
    """Turn ``model`` (an ``IncrementalSegmentationModule``) into RCIL's network, in place;
    returns its :class:`BranchMixer`.

    ``copy_twin``: the body twins start as copies of the main branch (RCIL copies the
    ImageNet ``conv2``/``bn2`` weights into them); False gives fresh ones. The head is drawn
    again with RCIL's Xavier gain (``head_slope`` 1.0, RC3), its twin independently.
    ``stem_activation`` fixes RC1, ``linear_norms`` RC2; ``generator`` fixes RC4."""
    if twin_layers(model):
        raise ValueError("the network already has twin branches")
    mixer = BranchMixer(generator)
    body = model.body
    for stage_name in ("mod2", "mod3", "mod4", "mod5"):
        stage = getattr(body, stage_name)
        for name, block in list(stage.named_children()):
            if not isinstance(block, ResidualBlock):
                raise TypeError(f"body.{stage_name}.{name} is not a residual block")
            stage._modules[name] = TwinResidualBlock.from_block(block, mixer, copy_twin)
    if not isinstance(model.head, DeeplabV3):
        raise TypeError("RCIL's twin branches need the DeepLab-v3 head")
    model.head = TwinDeeplabV3.from_head(model.head, mixer, head_slope)
    linearise_norms(model, keep=(body.mod1.bn1,) if stem_activation else (),
                    linear_norms=linear_norms)
    return mixer
