"""RCIL's re-parameterisation between steps (docs/behaviour.md, "RCIL", §R.4): the two
branches of every twin layer, each with its norm in eval form and the 1/2 of the eval average,
are folded into the main conv, which gains a bias and is frozen with an identity norm.

For a conv (weight W, optional bias c) followed by an In-Place ABN layer (gamma, beta, mu,
sigma^2, eps), :func:`fold_conv_norm` returns W', b' with W' * h + b' = 1/2 * norm(W * h + c):

    g = (|gamma| + eps) / 2,   s = g / sqrt(sigma^2 + eps)
    W' = s * W,   b' = beta / 2 - mu * s + s * c

:func:`fold_twin_branches` replaces the main conv by W'(main) + W'(twin), its bias by
b'(main) + b'(twin), sets the main norm to identity values with eps 0 and freezes both; the
twin keeps its values and keeps training (RC7). The main branch alone then equals the old
eval average, so the layer computes 1/2 * old average + 1/2 * twin in eval.
"""
import torch
import torch.nn as nn

from .branches import TwinDeeplabV3, TwinResidualBlock, twin_layers

__all__ = ["fold_conv_norm", "add_fold_biases", "fold_twin_branches", "folded_parts",
           "refreeze_folded", "restore_folded_eps", "collapse_for_inference",
           "RCIL_ASPP_WIDTH"]

# RCIL slices map_bn by a hard-coded 256 channels per ASPP conv (RC9)
RCIL_ASPP_WIDTH = 256


def _exact_scale(norm):
    """The scale the norm layer really applies: ``|weight| + eps`` for the in-place ABN
    variants, ``weight`` for ``abn`` and ``std``."""
    if hasattr(norm, "scale"):
        return norm.scale()
    if "InPlace" in type(norm).__name__:   # the compiled package's layers
        return norm.weight.abs() + norm.eps
    return norm.weight


def fold_conv_norm(weight, bias, norm, channels=slice(None), exact_scale=False):
    """(W', b') of one conv + norm pair, the eval average's 1/2 included. ``channels``: the
    norm's channels that follow this conv (a slice of ``map_bn`` for an ASPP conv).
    ``exact_scale`` uses the norm's own scale (``weight`` for ``abn``) instead of RCIL's
    ``|weight| + eps`` (fix of RC2)."""
    eps = norm.eps
    scale = _exact_scale(norm) if exact_scale else norm.weight.abs() + eps
    g = scale[channels] / 2
    std = torch.sqrt(norm.running_var[channels] + eps)
    s = g / std
    new_bias = norm.bias[channels] / 2 - norm.running_mean[channels] * g / std
    if bias is not None:
        new_bias = new_bias + s * bias
    return weight * s.view(-1, 1, 1, 1), new_bias


def _main_convs(layer):
    if isinstance(layer, TwinResidualBlock):
        return [layer.branches[0][0]]
    return list(layer.map_convs)


def add_fold_biases(model):
    """A zero bias on every main conv of a twin layer that has none: a folded network's
    state dict carries these biases, so a network must have them before such a load (RCIL
    adds them before loading the previous step)."""
    for layer in twin_layers(model):
        for conv in _main_convs(layer):
            if conv.bias is None:
                conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels))


def _set_identity(norm, eps=0.0):
    with torch.no_grad():
        norm.weight.fill_(1)
        norm.bias.zero_()
        norm.running_mean.zero_()
        norm.running_var.fill_(1)
    norm.eps = eps


def _set_affine(conv, norm, weight, bias):
    """Make conv + norm (eval) compute ``weight * h + bias``, the norm keeping its eps for
    training: gamma = running_var = 1 - eps gives the scale (1 - eps + eps) / sqrt(1) = 1."""
    eps = norm.eps
    with torch.no_grad():
        conv.weight.copy_(weight)
        norm.weight.fill_(1 - eps)
        norm.bias.copy_(bias)
        norm.running_mean.zero_()
        norm.running_var.fill_(1 - eps)


def folded_parts(model):
    """(frozen modules, frozen parameters) of a folded network: the main conv(s) and main
    norm of every folded twin layer."""
    modules = []
    for layer in twin_layers(model):
        if not getattr(layer, "folded", False):
            continue
        if isinstance(layer, TwinResidualBlock):
            modules.extend(layer.branches[0])
        else:
            modules.extend(list(layer.map_convs) + [layer.map_bn])
    params = [p for m in modules for p in (m.weight, m.bias) if p is not None]
    return modules, params


def refreeze_folded(model):
    """The folded parts back to eval with no gradient: RCIL re-applies this after every
    ``model.train()`` (RC25), as the norms would otherwise use batch statistics again."""
    modules, params = folded_parts(model)
    for m in modules:
        m.eval()
    for p in params:
        p.requires_grad_(False)


@torch.no_grad()
def _fold_block(block, exact_scale, reinit_twin):
    (conv, norm), (conv_new, norm_new) = block.branches
    w1, b1 = fold_conv_norm(conv.weight, conv.bias, norm, exact_scale=exact_scale)
    w2, b2 = fold_conv_norm(conv_new.weight, None, norm_new, exact_scale=exact_scale)
    conv.weight.copy_(w1 + w2)
    conv.bias = nn.Parameter(b1 + b2)   # a new Parameter, as RCIL (not in the optimiser, RC11)
    _set_identity(norm)
    if reinit_twin:
        _set_affine(conv_new, norm_new, w1 + w2, b1 + b2)


@torch.no_grad()
def _fold_head(head, exact_scale, reinit_twin, aspp_width):
    width = aspp_width or head.hidden_channels
    if width * len(head.map_convs) > head.map_bn.num_features:
        raise ValueError(f"the ASPP slices of {width} channels do not fit map_bn's "
                         f"{head.map_bn.num_features}; fold with aspp_width=None (RC9)")
    weights, biases = [], []
    for k, (conv, conv_new) in enumerate(zip(head.map_convs, head.map_convs_new)):
        part = slice(width * k, width * (k + 1))
        w1, b1 = fold_conv_norm(conv.weight, conv.bias, head.map_bn, part, exact_scale)
        w2, b2 = fold_conv_norm(conv_new.weight, None, head.map_bn_new, part, exact_scale)
        conv.weight.copy_(w1 + w2)
        conv.bias = nn.Parameter(b1 + b2)
        weights.append(w1 + w2)
        biases.append(b1 + b2)
    _set_identity(head.map_bn)
    if reinit_twin:
        for conv_new, w in zip(head.map_convs_new, weights):
            conv_new.weight.copy_(w)
        norm_new, eps = head.map_bn_new, head.map_bn_new.eps
        norm_new.weight.fill_(1 - eps)
        norm_new.bias.copy_(torch.cat(biases))
        norm_new.running_mean.zero_()
        norm_new.running_var.fill_(1 - eps)


def fold_twin_branches(model, *, reinit_twin=False, exact_scale=False,
                       aspp_width=RCIL_ASPP_WIDTH):
    """Fold every twin layer of ``model`` in place (RCIL's ``convert_model``, run at the
    start of every step > 0 on the new network) and freeze the folded parts.

    ``reinit_twin`` (fix of RC7): the twin is set to the folded conv with an identity norm,
    so the network starts equal to the old one. ``exact_scale`` (fix of RC2): fold with the
    norm's own scale. ``aspp_width=None`` (fix of RC9): slice ``map_bn`` by the head's
    hidden width instead of 256."""
    layers = twin_layers(model)
    if not layers:
        raise ValueError("the network has no twin branches to fold")
    for layer in layers:
        if isinstance(layer, TwinResidualBlock):
            _fold_block(layer, exact_scale, reinit_twin)
        elif isinstance(layer, TwinDeeplabV3):
            _fold_head(layer, exact_scale, reinit_twin, aspp_width)
        layer.folded = True
    refreeze_folded(model)


def restore_folded_eps(model):
    """Fix of RC8: a norm's eps is not in the state dict, so a folded network loaded from a
    file has eps 1e-5 in its identity norms (its frozen half scaled by sqrt(1 + 1e-5)).
    This sets eps 0 back on every main norm holding exactly the identity values behind a
    conv with a bias (what a fold leaves; a trained norm never holds them), and marks the
    layer folded."""
    for layer in twin_layers(model):
        if isinstance(layer, TwinResidualBlock):
            (conv, norm), _ = layer.branches
            convs = [conv]
        else:
            norm, convs = layer.map_bn, list(layer.map_convs)
        if any(c.bias is None for c in convs):
            continue
        if (torch.all(norm.weight == 1) and torch.all(norm.bias == 0)
                and torch.all(norm.running_mean == 0) and torch.all(norm.running_var == 1)):
            norm.eps = 0.0
            layer.folded = True


@torch.no_grad()
def collapse_for_inference(model):
    """Fix of RC10: fold the eval average of every twin layer into its main conv and drop
    the twins from the forward, giving one conv per layer at inference (the paper's "no
    extra cost"): the main conv becomes W'(main) + W'(twin), the halves of the eval average
    included, so it alone computes the average. The layers then draw nothing and run one
    branch; the result equals the two-branch eval output to float tolerance. For evaluation
    only (the twin's values stay in the state dict but no longer act)."""
    for layer in twin_layers(model):
        if isinstance(layer, TwinResidualBlock):
            (conv, norm), (conv_new, norm_new) = layer.branches
            w1, b1 = fold_conv_norm(conv.weight, conv.bias, norm)
            w2, b2 = fold_conv_norm(conv_new.weight, None, norm_new)
            conv.weight.copy_(w1 + w2)
            conv.bias = nn.Parameter(b1 + b2, requires_grad=False)
            _set_identity(norm)
        else:
            width = layer.hidden_channels
            for k, (conv, conv_new) in enumerate(zip(layer.map_convs, layer.map_convs_new)):
                part = slice(width * k, width * (k + 1))
                w1, b1 = fold_conv_norm(conv.weight, conv.bias, layer.map_bn, part)
                w2, b2 = fold_conv_norm(conv_new.weight, None, layer.map_bn_new, part)
                conv.weight.copy_(w1 + w2)
                conv.bias = nn.Parameter(b1 + b2, requires_grad=False)
            _set_identity(layer.map_bn)
        layer.single_branch = True
    model.eval()
