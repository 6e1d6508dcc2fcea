"""Weight-importance regularisers EWC, PI (path integral) and RW (Riemannian walk).

Behaviour as the original MiB code, with these practical differences:

* ``model`` and ``model_old`` are bare modules; every dictionary is keyed by the parameter
  name with the ``module.`` prefix of the original's DDP-wrapped model, so saved states move
  both ways between this project and original checkpoints. Loaded states may carry the
  prefix or not.
* every tensor stays on ``device`` (the original copies the parameters to the CPU at each
  update); ``update()`` and ``penalty()`` are a handful of multi-tensor (``_foreach``)
  kernels and never synchronise with the host.
* ``full_state()`` / ``load_full_state()`` capture everything needed to continue a step
  exactly after a crash (counters, snapshots, running sums, the previous importances);
  ``state_dict()`` / ``load_state_dict()`` keep the original's format and resume semantics.

The trainer calls ``update()`` after the task-loss backward (gradients already averaged over
processes, and unscaled when a loss scaler is used) and then back-propagates the
penalty times its weight if it is non-zero (``penalty()`` is the Python float 0.0 when
the penalty is disabled, a 0-dim tensor otherwise).
"""
import logging

import torch

from .checkpoint import PREFIX
from .errors import UserError

__all__ = ["RegularizerError", "EWC", "PI", "RW", "get_regularizer", "normalize_fn",
           "PREFIX", "FULL_STATE_FORMAT"]

logger = logging.getLogger(__name__)

FULL_STATE_FORMAT = "full-1"
_EPS_NORM = 1e-8


class RegularizerError(UserError, RuntimeError):
    """A regulariser cannot work with the model, gradients or state it was given."""


def normalize_fn(x):
    """Min-max normalisation over the whole tensor: (x - min) / (max - min + 1e-8)."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + _EPS_NORM)


def _key(name):
    return name if name.startswith(PREFIX) else PREFIX + name


def _named_params(model):
    return [(_key(n), p) for n, p in model.named_parameters()]


def _old_model_dict(model_old, device):
    # references to the frozen old model's tensors (no copy when already on device)
    return {_key(k): v.detach().to(device) for k, v in model_old.state_dict().items()}


def _load_tensors(state, device, dtypes):
    """A loaded {name: tensor} dict with prefixed keys, on ``device``, cast to the dtype of
    the matching parameter, never aliasing the caller's tensors."""
    out = {}
    for k, v in state.items():
        k = _key(k)
        v = torch.as_tensor(v).detach().to(device=device, dtype=dtypes.get(k))
        out[k] = v.clone()
    return out


def _clone_dict(d):
    return None if d is None else {k: v.detach().clone() for k, v in d.items()}


def _all_nonnegative(tensors):
    # one host sync, at construction time only
    tensors = list(tensors)
    if not tensors:
        return True
    return bool(torch.stack([t.min().to(torch.float64) for t in tensors]).min() >= 0)


class _WeightedSquaredDistance(torch.autograd.Function):
    """sum_n sum(w_n * (p_n - r_n)^2) over a list of tensors, with a fused multi-tensor
    forward and backward (d/dp = 2 w (p - r))."""

    @staticmethod
    def forward(ctx, refs, weights, nonneg, *params):
        diff = torch._foreach_sub(params, refs)
        wdiff = torch._foreach_mul(diff, weights)
        prod = torch._foreach_mul(wdiff, diff)
        # every term is >= 0 when the weights are, so the L1 norm is the sum (one kernel)
        sums = torch._foreach_norm(prod, 1) if nonneg else [t.sum() for t in prod]
        ctx.wdiff = wdiff
        return torch.stack(sums).sum()

    @staticmethod
    def backward(ctx, grad):
        grads = torch._foreach_mul(ctx.wdiff, grad * 2)
        del ctx.wdiff
        return (None, None, None, *grads)


def _weighted_penalty(params, refs, weights, nonneg, device):
    if not params:
        return torch.zeros((), device=device)
    return _WeightedSquaredDistance.apply(refs, weights, nonneg, *params)


def _moving_average_(running, grads, alpha):
    """running <- alpha * g^2 + (1 - alpha) * running, in place (same rounding as the
    original's out-of-place expression)."""
    if not running:
        return
    sq = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(sq, alpha)
    torch._foreach_mul_(running, 1 - alpha)
    torch._foreach_add_(running, sq)


def _snapshot(snap, params):
    """A detached on-device copy of the current parameters, reusing ``snap``'s storage."""
    if snap is None:
        return {k: p.detach().clone() for k, p in params}
    torch._foreach_copy_([snap[k] for k, _ in params], [p.detach() for _, p in params])
    return snap


class _Regularizer:
    name = None

    def __init__(self, model, device):
        self.model = model
        self.device = torch.device(device)

    def _params(self):
        return _named_params(self.model)

    def _dtypes(self):
        return {k: p.dtype for k, p in self._params()}

    def _load(self, tensors):
        return _load_tensors(tensors, self.device, self._dtypes())

    def _penalty_from(self, weights, refs, select_by_weights=False):
        """sum over trainable parameters of weights * (theta - refs)^2; the parameters taken
        are those in ``refs`` (EWC, RW) or in ``weights`` (PI), as the original."""
        params, r, w = [], [], []
        selector = weights if select_by_weights else refs
        for k, p in self._params():
            if k in selector and p.requires_grad:
                if k not in weights or k not in refs:
                    raise RegularizerError(
                        f"the {self.name.upper()} penalty has no importance or reference value "
                        f"for parameter {k}; the previous step was trained with a different "
                        f"model or frozen layers (--fix_bn)")
                params.append(p)
                r.append(refs[k])
                w.append(weights[k])
        return _weighted_penalty(params, r, w, self._nonneg, self.device)

    def _check_full_state(self, state):
        if state.get("format") != FULL_STATE_FORMAT or state.get("name") != self.name:
            raise RegularizerError(
                f"not a full {self.name} regulariser state (got name={state.get('name')!r}, "
                f"format={state.get('format')!r}); use load_state_dict for original-format "
                f"states")


class EWC(_Regularizer):
    """Elastic weight consolidation with a moving-average Fisher estimate."""

    name = "ewc"

    def __init__(self, model, model_old, device, fisher=None, alpha=0.9, normalize=True):
        super().__init__(model, device)
        self.alpha = alpha
        self.normalize = normalize
        self.model_old_dict = None if model_old is None else _old_model_dict(model_old,
                                                                               self.device)
        self.penalize = model_old is not None
        self.fisher = {}
        self.fisher_old = None
        if fisher is not None:
            self.fisher = self._load(fisher)
            self.fisher_old = {k: normalize_fn(v) if normalize else v.clone()
                               for k, v in self.fisher.items()}
        else:
            self.penalize = False
        self._add_missing_fisher()
        self._nonneg = _all_nonnegative(self.fisher_old.values()) if self.penalize else True

    def _add_missing_fisher(self):
        for k, p in self._params():
            if p.requires_grad and k not in self.fisher:
                self.fisher[k] = torch.ones_like(p.detach())

    def update(self):
        grads, running = [], []
        for k, p in self._params():
            if p.grad is None:
                raise RegularizerError(
                    f"EWC needs the gradient of every parameter, but {k} has none (frozen or "
                    f"unused); EWC cannot be combined with --fix_bn")
            grads.append(p.grad)
            running.append(self.fisher[k])
        _moving_average_(running, grads, self.alpha)

    def penalty(self):
        if not self.penalize:
            return 0.
        return self._penalty_from(self.fisher_old, self.model_old_dict)

    def state_dict(self):
        return {"name": self.name, "fisher": _clone_dict(self.fisher), "alpha": self.alpha}

    def load_state_dict(self, state):
        self.fisher = self._load(state["fisher"])
        self.alpha = state["alpha"]
        self._add_missing_fisher()

    def full_state(self):
        return {"name": self.name, "format": FULL_STATE_FORMAT, "alpha": self.alpha,
                "normalize": self.normalize, "penalize": self.penalize,
                "fisher": _clone_dict(self.fisher), "fisher_old": _clone_dict(self.fisher_old)}

    def load_full_state(self, state):
        self._check_full_state(state)
        self.alpha, self.normalize = state["alpha"], state["normalize"]
        self.fisher = self._load(state["fisher"])
        self.fisher_old = None if state["fisher_old"] is None else self._load(state["fisher_old"])
        self.penalize = state["penalize"] and self.model_old_dict is not None
        self._nonneg = _all_nonnegative(self.fisher_old.values()) if self.penalize else True


class PI(_Regularizer):
    """Path integral (synaptic intelligence) importance."""

    name = "pi"

    def __init__(self, model, model_old, device, score=None, normalize=False):
        super().__init__(model, device)
        self.normalize = normalize
        params = self._params()
        self.starting_model = {}
        if model_old is not None:
            self.model_old_dict = _old_model_dict(model_old, self.device)
            for k, p in params:
                if k not in self.model_old_dict:    # the new classifier: its initial value
                    self.starting_model[k] = p.detach().clone()
            self.model_old_dict.update(self.starting_model)
            self._own_refs = set(self.starting_model)
            self.penalize = True
        else:
            self.model_old_dict = {k: p.detach().clone() for k, p in params}
            self._own_refs = set(self.model_old_dict)
            self.penalize = False
        if score is not None:
            self.score_old = self._load(score)
            self.score = {k: normalize_fn(v) if normalize else v.clone()
                          for k, v in self.score_old.items()}
        else:
            self.score_old = self.score = None
            self.penalize = False
        self.delta = {k: torch.zeros_like(p.detach()) for k, p in params}
        self.model_temp = None
        self._nonneg = _all_nonnegative(self.score.values()) if self.penalize else True

    def update(self):
        params = self._params()
        if self.model_temp is not None:
            with_grad = [(k, p) for k, p in params if p.grad is not None]
            if with_grad:
                # D += g_k * (theta_{k-1} - theta_k)
                diff = torch._foreach_sub([self.model_temp[k] for k, _ in with_grad],
                                          [p.detach() for _, p in with_grad])
                torch._foreach_addcmul_([self.delta[k] for k, _ in with_grad],
                                        [p.grad for _, p in with_grad], diff)
        self.model_temp = _snapshot(self.model_temp, params)

    def penalty(self):
        if not self.penalize:
            return 0.
        return self._penalty_from(self.score, self.model_old_dict, select_by_weights=True)

    def get_score(self):
        score = {}
        for k, p in self._params():
            d = p.detach() - self.model_old_dict[k]
            s = self.delta[k] / (d * d + 1e-20)
            s = torch.where(s > 0, s, torch.zeros_like(s))
            if self.score_old is not None and k in self.score_old:
                s = s + self.score_old[k]          # importances are summed over steps
            score[k] = s
        return score

    def state_dict(self):
        return {"name": self.name, "score": self.get_score(), "delta": _clone_dict(self.delta),
                "starting_model": _clone_dict(self.starting_model)}

    def load_state_dict(self, state):
        self.delta = {k: torch.zeros_like(p.detach()) for k, p in self._params()}
        self.delta.update(self._load(state["delta"]))
        for k, v in self._load(state["starting_model"]).items():
            self.model_old_dict[k] = v
            self.starting_model[k] = v

    def full_state(self):
        return {"name": self.name, "format": FULL_STATE_FORMAT, "normalize": self.normalize,
                "penalize": self.penalize, "delta": _clone_dict(self.delta),
                "model_temp": _clone_dict(self.model_temp),
                "starting_model": _clone_dict(self.starting_model),
                "reference": {k: self.model_old_dict[k].clone() for k in self._own_refs},
                "score_old": _clone_dict(self.score_old), "score": _clone_dict(self.score)}

    def load_full_state(self, state):
        self._check_full_state(state)
        self.normalize = state["normalize"]
        self.delta = self._load(state["delta"])
        self.model_temp = None if state["model_temp"] is None else self._load(state["model_temp"])
        self.starting_model = self._load(state["starting_model"])
        reference = self._load(state["reference"])
        self.model_old_dict.update(reference)
        self._own_refs = set(reference)
        self.score_old = None if state["score_old"] is None else self._load(state["score_old"])
        self.score = None if state["score"] is None else self._load(state["score"])
        self.penalize = state["penalize"] and self.score is not None
        self._nonneg = _all_nonnegative(self.score.values()) if self.penalize else True


class RW(_Regularizer):
    """Riemannian walk: moving-average Fisher plus a path score updated every
    ``iterations`` calls."""

    name = "rw"

    def __init__(self, model, model_old, device, score=None, fisher=None, alpha=0.9,
                 iterations=10, normalize=True):
        super().__init__(model, device)
        self.alpha = alpha
        self.iterations = iterations
        self.normalize = normalize
        params = self._params()
        # Without an old model the original keeps a copy of the initial model that nothing
        # reads (the penalty is disabled); it is not kept here.
        self.model_old_dict = {} if model_old is None else _old_model_dict(model_old,
                                                                             self.device)
        self.penalize = model_old is not None
        self.fisher = {}
        if fisher is not None and score is not None:
            self.fisher = self._load(fisher)
            self.score_old = self._load(score)
            missing = [k for k in self.fisher if k not in self.score_old]
            if missing:
                raise RegularizerError(f"the previous step's RW state has a Fisher but no score "
                                       f"for {missing[0]}; the state is damaged")
            norm = normalize_fn if normalize else (lambda t: t)
            self.score_plus_fisher = {k: norm(v) + norm(self.score_old[k])
                                      for k, v in self.fisher.items()}
        else:
            self.score_old = self.score_plus_fisher = None
            self.penalize = False
        self.score = {k: torch.zeros_like(p.detach()) for k, p in params if p.requires_grad}
        self._add_missing_fisher()
        self.count = 0
        self.model_temp = None
        self._nonneg = (_all_nonnegative(self.score_plus_fisher.values()) if self.penalize
                        else True)

    def _add_missing_fisher(self):
        for k, p in self._params():
            if p.requires_grad and k not in self.fisher:
                self.fisher[k] = torch.ones_like(p.detach())

    def update(self):
        params = self._params()
        with_grad = [(k, p) for k, p in params if p.grad is not None]
        grads = [p.grad for _, p in with_grad]
        fisher = [self.fisher[k] for k, _ in with_grad]
        if self.count % self.iterations == 0:
            if self.model_temp is not None and with_grad:
                # s += g (theta_tmp - theta) / (F/2 (theta - theta_tmp)^2 + 1e-8), F before
                # this iteration's moving-average update
                d = torch._foreach_sub([self.model_temp[k] for k, _ in with_grad],
                                       [p.detach() for _, p in with_grad])
                den = torch._foreach_mul(d, d)
                torch._foreach_mul_(den, fisher)
                torch._foreach_mul_(den, 0.5)
                torch._foreach_add_(den, 1e-8)
                torch._foreach_mul_(d, grads)          # d becomes the numerator
                torch._foreach_div_(d, den)
                torch._foreach_add_([self.score[k] for k, _ in with_grad], d)
            self.model_temp = _snapshot(self.model_temp, params)
        self.count += 1
        _moving_average_(fisher, grads, self.alpha)

    def penalty(self):
        if not self.penalize:
            return 0.
        return self._penalty_from(self.score_plus_fisher, self.model_old_dict)

    def get_score(self):
        score = {}
        for k, v in self.score.items():
            s = torch.where(v >= 0, v, torch.zeros_like(v))
            if self.score_old is not None and k in self.score_old:
                s = 0.5 * (s + self.score_old[k])   # importances are averaged over steps
            score[k] = s
        return score

    def state_dict(self):
        return {"name": self.name, "score": self.get_score(), "fisher": _clone_dict(self.fisher),
                "iteration": self.iterations, "alpha": self.alpha}

    def load_state_dict(self, state):
        # As the original: the saved (already clamped and averaged) score becomes the
        # running score, so a further save averages it with the previous score again.
        self.iterations = state["iteration"]
        self.alpha = state["alpha"]
        self.fisher = self._load(state["fisher"])
        self._add_missing_fisher()
        score = self._load(state["score"])
        self.score = {k: torch.zeros_like(p.detach()) for k, p in self._params()
                      if p.requires_grad}
        self.score.update(score)

    def full_state(self):
        return {"name": self.name, "format": FULL_STATE_FORMAT, "alpha": self.alpha,
                "iterations": self.iterations, "normalize": self.normalize,
                "penalize": self.penalize, "count": self.count,
                "fisher": _clone_dict(self.fisher), "score": _clone_dict(self.score),
                "model_temp": _clone_dict(self.model_temp),
                "score_plus_fisher": _clone_dict(self.score_plus_fisher),
                "score_old": _clone_dict(self.score_old)}

    def load_full_state(self, state):
        self._check_full_state(state)
        self.alpha, self.iterations = state["alpha"], state["iterations"]
        self.normalize, self.count = state["normalize"], state["count"]
        self.fisher = self._load(state["fisher"])
        self.score = self._load(state["score"])
        self.model_temp = None if state["model_temp"] is None else self._load(state["model_temp"])
        spf = state["score_plus_fisher"]
        self.score_plus_fisher = None if spf is None else self._load(spf)
        self.score_old = None if state["score_old"] is None else self._load(state["score_old"])
        self.penalize = (state["penalize"] and bool(self.model_old_dict)
                         and self.score_plus_fisher is not None)
        self._nonneg = (_all_nonnegative(self.score_plus_fisher.values()) if self.penalize
                        else True)


def _needed(old_state, key, name):
    if key not in old_state:
        raise RegularizerError(
            f"the previous step's regulariser state ({old_state.get('name')!r}) has no "
            f"{key!r}, which {name.upper()} needs; run every step with the same --method "
            f"(the same regulariser)")
    return old_state[key]


def get_regularizer(model, model_old, device, name, old_state, *, alpha, iterations,
                    normalize):
    """The regulariser ``name`` (None, 'ewc', 'pi', 'rw'), built from the previous step's
    ``trainer_state['regularizer']`` (or None); ``alpha`` (EWC, RW), ``iterations`` (RW) and
    ``normalize`` are its settings (the options' reading is the method's,
    ``methods/regularizers.py``). A name that differs from the previous state's only logs a
    warning, as the original."""
    if old_state is not None and old_state.get("name", name) != name:
        logger.warning("the regulariser %s differs from the one of the previous step's state "
                       "(%s)", name, old_state.get("name"))
    if name is None:
        return None
    if name == "ewc":
        fisher = None if old_state is None else _needed(old_state, "fisher", name)
        return EWC(model, model_old, device, fisher=fisher, alpha=alpha,
                   normalize=normalize)
    if name == "pi":
        score = None if old_state is None else _needed(old_state, "score", name)
        return PI(model, model_old, device, score=score, normalize=normalize)
    if name == "rw":
        score = fisher = None
        if old_state is not None:
            score = _needed(old_state, "score", name)
            fisher = _needed(old_state, "fisher", name)
        return RW(model, model_old, device, score=score, fisher=fisher, alpha=alpha,
                  iterations=iterations, normalize=normalize)
    raise RegularizerError(f"unknown regulariser {name!r}; use ewc, pi or rw")
