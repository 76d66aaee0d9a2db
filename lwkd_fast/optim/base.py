"""The shared machinery of :class:`~lwkd_fast.optim.LayerwiseSGD` and
:class:`~lwkd_fast.optim.LayerwiseAdamW`: construction, the rule's state, the step."""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops, rule
from .checkpoint import _Checkpointing
from .groups import _Groups
from .placement import _Placement
from .skipping import _SkipTracking, _Unsettled
from .worklist import _WorkList, _group_args

DEFAULT_RATE_NORMALIZE = "running"  # the rule of the optimizers unless told otherwise (SPEC section 4)
_SYNC_CHOICES = (None, "all_reduce")
# the keyword options of _LayerwiseOptimizer.__init__, which every optimizer's constructor takes
_RULE_OPTIONS = ("rate_momentum", "gamma", "s_min", "s_max", "sync", "num_layers", "rate_eps", "process_group",
                 "rate_normalize", "rate_ref_momentum")


def _split_arguments(arguments: Dict[str, Any], default_keys: Sequence[str]
                     ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """An optimizer constructor's arguments (its ``locals()``) as torch.optim's ``defaults`` (the
    algorithm's hyper-parameters, ``default_keys`` in that order) and the rule's keyword options."""
    return {k: arguments[k] for k in default_keys}, {k: arguments[k] for k in _RULE_OPTIONS}


class _LayerwiseOptimizer(_Checkpointing, _SkipTracking, _Placement, _Groups, torch.optim.Optimizer):
    """Shared machinery of :class:`LayerwiseSGD` and :class:`LayerwiseAdamW` (the mixins: groups,
    placement, skipped steps, checkpoints)."""

    _algorithm = ""
    _op = ""  # the step op (.step_op)
    _name = ""

    def __init__(self, groups, defaults: Dict[str, Any], *, rate_momentum: float, gamma: float,
                 s_min: float, s_max: float, sync: Optional[str], num_layers: Optional[int],
                 rate_eps: float, process_group=None, rate_normalize: str = DEFAULT_RATE_NORMALIZE,
                 rate_ref_momentum: float = rule.DEFAULT_REF_MOMENTUM) -> None:
        name = self._name
        rule.check_rule_options(name, rate_momentum, gamma, s_min, s_max, rate_eps, momentum_name="rate_momentum",
                                rate_normalize=rate_normalize, ref_momentum=rate_ref_momentum,
                                ref_momentum_name="rate_ref_momentum")
        if sync not in _SYNC_CHOICES:
            raise ValueError(f"{name}: unknown sync {sync!r}; expected None or 'all_reduce'")
        if isinstance(groups, torch.Tensor):
            raise TypeError(f"{name}: groups must be a list of dicts with 'params' and 'layer', got a Tensor")
        groups = list(groups)
        if not groups:
            raise ValueError(f"{name}: got an empty list of parameter groups")
        layers = []
        for i, g in enumerate(groups):
            if not isinstance(g, dict):
                raise TypeError(
                    f"{name}: group {i} is a {type(g).__name__}; every group must be a dict with 'params' and "
                    "'layer' (j in 0..K-1, or None for the head)"
                )
            if "layer" not in g:
                raise ValueError(
                    f"{name}: group {i} has no 'layer' key; give each group 'layer': j (its matched layer, "
                    "0..K-1) or 'layer': None for the head group"
                )
            layers.append(self._check_layer(i, g["layer"], None))
        inferred = 1 + max((j for j in layers if j is not None), default=-1)
        if num_layers is None:
            num_layers = inferred
        elif not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < inferred:
            raise ValueError(f"{name}: num_layers={num_layers!r} but the groups use layers up to {inferred - 1}")
        self._num_layers = int(num_layers)
        self._device: Optional[torch.device] = None
        self.rate_momentum, self.gamma, self.s_min, self.s_max = (float(rate_momentum), float(gamma),
                                                                  float(s_min), float(s_max))
        self.rate_eps = float(rate_eps)
        self.rate_normalize, self.rate_ref_momentum = rate_normalize, float(rate_ref_momentum)
        self.sync = sync
        self.process_group = process_group
        self._version = 0            # bumped whenever the cached work list may be stale
        self._flat_key = None
        self._flat: List[Tuple[torch.Tensor, int]] = []
        self._flat_params: List[torch.Tensor] = []
        self._work: Optional[_WorkList] = None
        super().__init__(groups, defaults)
        self._source = None
        # state entries created on a step that may have been skipped (see _Unsettled)
        self._unsettled: Dict[torch.Tensor, _Unsettled] = {}
        self._zero_fresh = False
        self._init_rate_state(self._device or torch.device("cpu"))

    def _init_rate_state(self, dev: torch.device) -> None:
        """The rule's state on ``dev``: factors m = 1, counters 0, rates = the base rates."""
        K = self._num_layers
        self._device = dev
        self._factors = torch.ones(K, dtype=torch.float32, device=dev)
        self._nonfinite = torch.zeros((), dtype=torch.int64, device=dev)
        self._skipped = torch.zeros((), dtype=torch.int64, device=dev)
        self._rate_ref = rule.new_reference_state(K, torch.float32, dev)  # used by rate_normalize="running"
        lrs, lr_t = self._layer_base_lrs()
        if lr_t is not None:
            self._rates = lr_t.to(torch.float32).clone()
        else:
            self._rates = torch.tensor(lrs if len(lrs) == K else lrs * K, dtype=torch.float32).to(dev)
        self._placeholder = torch.empty(0, dtype=torch.float32, device=dev)

    # ---- properties ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """K, the number of matched layers (length of ``discrepancies``)."""
        return self._num_layers

    @property
    def rates(self) -> torch.Tensor:
        """(K,) float32 device tensor: the per-layer rates ``eta_j`` the last step applied."""
        return self._rates

    @property
    def factors(self) -> torch.Tensor:
        """(K,) float32 device tensor: the rule's momentum factors ``m_j`` (``eta_j = lr_j m_j``)."""
        return self._factors

    @property
    def rate_reference(self) -> torch.Tensor:
        """(2, K) float32 device tensor: the rule's running reference of ``rate_normalize="running"``
        (row 0 the moving averages of each layer's D, row 1 their accumulated weights; the
        reference is ``R_j = row0[j] / row1[j]``).  Zeros, and unused, with ``"none"``."""
        return self._rate_ref

    @property
    def nonfinite_steps(self) -> torch.Tensor:
        """0-dim int64 device tensor: steps at which some discrepancy was unusable (non-finite or
        negative)."""
        return self._nonfinite

    @property
    def skipped_steps(self) -> torch.Tensor:
        """0-dim int64 device tensor: steps skipped on the device because ``found_inf`` was nonzero."""
        return self._skipped

    # ---- the discrepancy source ------------------------------------------------------------------
    def attach(self, source) -> "_LayerwiseOptimizer":
        """Pull the step's inputs from ``source`` when ``step()`` is called without them (KD
        frameworks call ``optimizer.step()`` with no arguments).

        ``source`` is any object with the attribute ``latest_discrepancies`` (a (K,) tensor, or
        None before its first forward) and, optionally, ``found_inf`` (a 0-dim float32 device
        tensor or None), e.g. a :class:`~lwkd_fast.LayerwiseDistiller`.  Both are read at every
        ``step()``: ``discrepancies`` defaults to ``source.latest_discrepancies`` and
        ``found_inf`` to ``source.found_inf``.  Returns the optimizer.  Copies of the optimizer
        (``copy.deepcopy``, pickling) are not attached."""
        if not hasattr(source, "latest_discrepancies"):
            raise TypeError(f"{self._name}.attach: {type(source).__name__} has no attribute 'latest_discrepancies'; "
                            "a source exposes latest_discrepancies ((K,) tensor or None) and found_inf "
                            "(0-dim tensor or None)")
        self._source = source
        return self

    def detach_source(self) -> None:
        """Forget the source set by :meth:`attach` (``step()`` then needs its arguments again)."""
        self._source = None

    @property
    def source(self):
        """The object set by :meth:`attach`, or None."""
        return self._source


    # ---- the step --------------------------------------------------------------------------------
    def _hyper_lists(self, groups: Sequence[Dict[str, Any]]) -> Tuple[List[Any], ...]:
        """The step op's named hyper-parameter lists, one entry per group, in its schema's order."""
        raise NotImplementedError

    def _launch(self, backend: str, work: "_WorkList", params, grads, groups_args, found_inf) -> None:
        """The step op's call on ``backend`` for the work list (``params`` / ``grads``: its kernel inputs)."""
        raise NotImplementedError

    def _state_flags(self, group) -> bool:
        """Whether the group needs the optional state list (SGD momentum / AdamW amsgrad)."""
        raise NotImplementedError

    def _gather(self, flat, grads) -> "_WorkList":
        """Build the work list from the flat (param, group index) list and its gradients,
        creating state that is due (slow path, run when the set of gradients changes)."""
        raise NotImplementedError

    def _with_grads(self, flat, grads):
        """``(op, p, gi, g)`` for each ``(p, gi)`` of ``flat`` whose gradient ``g`` is not None, the
        gradient checked against its parameter as it is reached (in the pass that builds the work
        list, so errors come in parameter order)."""
        op = f"{self._name}.step"
        for (p, gi), g in zip(flat, grads):
            if g is not None:
                self._check_grad(op, gi, p, g)
                yield op, p, gi, g

    def _work_list(self) -> Tuple["_WorkList", List[torch.Tensor]]:
        """The work list of this step and the gradients of its tensors.

        The flat parameter list and the work list are cached; a step only reads ``p.grad`` of
        every parameter (one list comprehension) and reuses the cached lists while the same
        parameters have gradients, so there is no per-tensor Python bookkeeping (state look-ups,
        list building) on the hot path.  The cache is rebuilt when the groups, their parameter
        lists, the state dict or the set of parameters with a gradient change."""
        groups = self.param_groups
        key = (id(self.state), self._version,
               tuple((id(g["params"]), len(g["params"]), self._state_flags(g)) for g in groups))
        if self._flat_key != key:
            self._flat = [(p, gi) for gi, g in enumerate(groups) for p in g["params"]]
            self._flat_params = [p for p, _ in self._flat]
            self._flat_key = key
            self._work = None
        grads = [p.grad for p in self._flat_params]
        present = [g is not None for g in grads]
        work = self._work
        if work is None or work.present != present or not work.same_params():
            work = self._gather(self._flat, grads)
            work.present = present
            self._work = work
            return work, work.grads
        return work, list(itertools.compress(grads, present))

    def _sync_discrepancies(self, d: torch.Tensor, found_inf: Optional[torch.Tensor] = None):
        """All-reduce ``d`` (mean over the group) and the skip flag (nonzero on every rank as
        soon as it is nonzero on one: after a gradient all-reduce a non-finite loss on one rank
        reaches every rank's gradients).  ONE collective of K + 1 values on every rank, whether
        or not this rank has a flag (a rank without one contributes 0), so ranks that differ in
        passing ``found_inf`` still run the same collective and skip together.  Returns the
        averaged D and the reduced flag (the number of ranks that skip; None only in a world of
        one without a flag)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"{self._name}: sync='all_reduce' needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first, or pass sync=None)"
            )
        world = dist.get_world_size(self.process_group)
        if world == 1:
            return d, found_inf
        dt = torch.float64 if d.dtype == torch.float64 else torch.float32
        flag = (torch.zeros(1, dtype=dt, device=d.device) if found_inf is None
                else (found_inf != 0).to(dt).reshape(1))
        buf = torch.cat([d.to(dt), flag])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
        return buf[:-1].div_(world), buf[-1].to(torch.float32)

    def _update_rates(self, d: torch.Tensor, found_inf: Optional[torch.Tensor],
                      skip: Optional[torch.Tensor]) -> None:  # runs under torch.no_grad() (see step)
        lrs, lr_t = self._layer_base_lrs()
        backend = ops.select_backend(rule.OP, self._factors.device)
        ref = self._rate_ref if self.rate_normalize == "running" else None
        eta = rule._backend_call(backend, d, self._factors, self._nonfinite, lrs or [1.0], lr_t,
                                 self.rate_momentum, self.gamma, self.s_min, self.s_max, self.rate_eps, found_inf,
                                 ref, self.rate_ref_momentum)
        if skip is None:
            self._rates.copy_(eta)
        else:  # a skipped step leaves the applied rates as they were (the base rate may have moved)
            self._rates.copy_(torch.where(skip, self._rates, eta))

    def step(self, discrepancies: Optional[torch.Tensor] = None, closure=None, *,
             found_inf: Optional[torch.Tensor] = None):
        """Update the per-layer rates from ``discrepancies`` (K,) on the device, then every
        parameter of every group in one fused pass.

        ``discrepancies`` defaults to ``source.latest_discrepancies`` of the object set by
        :meth:`attach`.  ``found_inf`` (0-dim float32 tensor on the parameters' device, default
        ``source.found_inf`` when a source is attached, else None): when it is nonzero the step
        is skipped on the device -- no parameter, optimizer state, rule state or rate changes,
        as if ``step()`` had not been called -- and :attr:`skipped_steps` counts it; no host
        synchronisation either way.  ``closure`` (optional) is re-evaluated with gradients
        enabled first, as in torch.optim, and its loss is returned (the source is read after
        it).  ``step(closure)`` with a callable as the only argument is ``step(closure=closure)``.

        A step whose every base rate ``group["lr"]`` is 0 needs no discrepancies (that is how
        ``torch.distributed.checkpoint.state_dict`` creates an optimizer's state): without them
        the rule is not applied and only the state is created, as by ``torch.optim``."""
        name = f"{self._name}.step"
        if closure is None and callable(discrepancies) and not isinstance(discrepancies, torch.Tensor):
            discrepancies, closure = None, discrepancies
        src = self._source
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if discrepancies is None and src is not None:
            discrepancies = src.latest_discrepancies
        if discrepancies is None and not self._all_base_rates_zero():
            if src is None:
                raise RuntimeError(f"{name}: no discrepancies given and no source attached; call "
                                   "opt.step(discrepancies) with the (K,) tensor, or opt.attach(distiller) once")
            raise RuntimeError(f"{name}: the attached source ({type(src).__name__}) has latest_discrepancies=None; "
                               "run its forward pass before the step")
        if found_inf is None and src is not None:
            found_inf = getattr(src, "found_inf", None)
        with torch.no_grad():
            self._follow_params()
            dev = self._factors.device
            d = None if discrepancies is None else rule.check_discrepancies(name, discrepancies, self._num_layers,
                                                                            dev)
            fi = rule.check_found_inf(name, found_inf, dev)
            if self.sync == "all_reduce" and d is not None:
                d, fi = self._sync_discrepancies(d, fi)
            skip = None if fi is None else fi != 0
            if self._unsettled:
                self._settle()
            if d is not None:
                self._update_rates(d, fi, skip)
            groups_args = (*_group_args(self.param_groups), *self._hyper_lists(self.param_groups))
            self._zero_fresh = fi is not None
            work, grads = self._work_list()
            if work.params:
                params, grads, copies = work.kernel_inputs(grads)
                backend = ops.select_backend(self._op, dev)
                if self._unsettled and self._algorithm == "sgd" and work.s1:
                    self._split_step(backend, work, params, grads, groups_args, fi, skip)
                else:
                    self._launch(backend, work, params, grads, groups_args, fi)
                for param, dense in copies:  # copy-out of the non-dense parameters' working copies
                    param.copy_(dense)
            created = work.commit(self.state)
            if skip is not None:
                self._skipped.add_(skip)
            if self._unsettled or (created and skip is not None):
                self._track(work, created, skip)
        return loss

    def _all_base_rates_zero(self) -> bool:
        """Whether every group's base rate is 0 (a tensor rate is read only from host memory)."""
        for g in self.param_groups:
            lr = g["lr"]
            if isinstance(lr, torch.Tensor):
                if lr.device.type != "cpu" or lr.numel() != 1 or lr.detach().reshape(()).item() != 0.0:
                    return False
            elif lr != 0:
                return False
        return True


    def __repr__(self) -> str:
        return (f"{type(self).__name__}(K={self._num_layers}, groups={len(self.param_groups)}, "
                f"rate_momentum={self.rate_momentum}, gamma={self.gamma}, s_min={self.s_min}, "
                f"s_max={self.s_max}, rate_normalize={self.rate_normalize!r}, sync={self.sync!r})")
