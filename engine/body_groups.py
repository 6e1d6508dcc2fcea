"""The body's optimiser group(s): one group at ``--lr`` with ``--weight_decay`` on every
tensor (MiB, PLOP and NeST, whatever the backbone), or, with the fixes of W8
(docs/behaviour.md §20), a learning-rate factor and no decay on norms, biases and
relative-position tables."""


def no_decay(name, param):
    """Norm weights and biases (1-D tensors) and Swin's relative-position tables."""
    return param.ndim <= 1 or name.endswith("relative_position_bias_table")


def body_param_groups(body, opts):
    factor = getattr(opts, "body_lr_factor", 1.0)
    extra = {} if factor == 1.0 else {"lr": opts.lr * factor}
    named = [(n, p) for n, p in body.named_parameters() if p.requires_grad]
    if not getattr(opts, "no_decay_norms", False):
        return [{"params": [p for _, p in named], "weight_decay": opts.weight_decay, **extra}]
    return [{"params": [p for n, p in named if not no_decay(n, p)],
             "weight_decay": opts.weight_decay, **extra},
            {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0, **extra}]
