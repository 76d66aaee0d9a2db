"""Checkpoints: ``state_dict`` / ``load_state_dict`` with the layer-wise record, pickling and
``copy.deepcopy``."""

from __future__ import annotations

import itertools
import numbers
from typing import Any, Dict, Tuple

import torch

from .. import rule


class _Checkpointing:
    """Mixin of :class:`~lwkd_fast.optim.base._LayerwiseOptimizer`: its state dict and pickled
    form."""

    def _layerwise_state(self) -> Dict[str, Any]:
        return {
            "factors": self._factors,
            "rates": self._rates,
            "nonfinite_steps": self._nonfinite,
            "skipped_steps": self._skipped,
            "num_layers": self._num_layers,
            "rate_momentum": self.rate_momentum,
            "gamma": self.gamma,
            "s_min": self.s_min,
            "s_max": self.s_max,
            "rate_eps": self.rate_eps,
            "rate_normalize": self.rate_normalize,
            "rate_ref_momentum": self.rate_ref_momentum,
            "rate_reference": self._rate_ref,
            "sync": self.sync,
            "algorithm": self._algorithm,
        }

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's state dict plus ``"layerwise"``: factors, rates, the non-finite and
        skipped-step counters and the rule's hyper-parameters (references to the live tensors,
        as torch does).  The same record is also ``param_groups[0]["layerwise"]``, because
        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` keeps only
        ``state`` and ``param_groups``.  If state was created on steps whose skip flag the host
        has not seen yet, this waits for the flag once (so the dict holds no never-initialised
        entries)."""
        if self._unsettled:
            self._settle(block=True)
        sd = super().state_dict()
        record = self._layerwise_state()
        sd["layerwise"] = record
        if sd["param_groups"]:
            sd["param_groups"][0]["layerwise"] = record
        return sd

    _STATE_KEYS: Tuple[str, ...] = ()  # the per-parameter state keys the step uses

    @staticmethod
    def _find_layerwise(op: str, state_dict) -> Dict[str, Any]:
        lw = state_dict.get("layerwise") if isinstance(state_dict, dict) else None
        if lw is None and isinstance(state_dict, dict):
            groups = state_dict.get("param_groups") or []
            lw = next((g["layerwise"] for g in groups if isinstance(g, dict) and "layerwise" in g), None)
        if not isinstance(lw, dict):
            raise ValueError(f"{op}: the state dict has no 'layerwise' entry (it was not saved by a LayerwiseSGD / "
                             "LayerwiseAdamW)")
        return lw

    def _check_loaded_shapes(self, op: str, sd: Dict[str, Any]) -> None:
        """Before anything is loaded: every state tensor has its parameter's shape (torch.optim
        would load another model's state whenever the group sizes agree)."""
        saved = sd.get("param_groups") or []
        if len(saved) != len(self.param_groups):
            return  # torch's load_state_dict raises for this
        ids = itertools.chain.from_iterable(g.get("params", ()) for g in saved)
        mine = ((gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"])
        where = dict(zip(ids, mine))
        for k, st in (sd.get("state") or {}).items():
            if k not in where or not isinstance(st, dict):
                continue
            gi, p = where[k]
            for key, v in st.items():
                if key not in self._STATE_KEYS or v is None:
                    continue
                if key == "step":
                    ok = isinstance(v, numbers.Number) or (isinstance(v, torch.Tensor) and v.numel() == 1)
                else:
                    ok = isinstance(v, torch.Tensor) and v.shape == p.shape
                if not ok:
                    got = f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(
                        f"{op}: state[{key!r}] of {self._param_name(gi, p)} in the checkpoint has {got} but the "
                        f"parameter has shape {tuple(p.shape)}: the checkpoint was saved for another model (or "
                        "with other parameter groups)")

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (also one that went through torch.distributed.checkpoint,
        which carries the layer-wise record in ``param_groups[0]``).  Every state tensor is
        checked against its parameter first (shape; then dtype, placements) and placed like
        torch.optim places it -- on the parameter's device, floating state in its dtype -- and
        in the kernels' memory layout; the rate state goes to the parameters' device.  State
        tensors are copied (the optimizer never shares storage with the dict it loaded from).
        ``sync`` and ``process_group`` stay as constructed: they describe this run, not the
        checkpoint."""
        name = self._name
        op = f"{name}.load_state_dict"
        lw = self._find_layerwise(op, state_dict)
        if lw.get("algorithm", self._algorithm) != self._algorithm:
            raise ValueError(f"{op}: the state dict was saved by a {lw.get('algorithm')!r} optimizer, this one is "
                             f"{self._algorithm!r}")
        K = int(lw["num_layers"])
        if K != self._num_layers:
            raise ValueError(f"{op}: the state dict has num_layers={K} but this optimizer has {self._num_layers}")
        for key in ("factors", "rates"):
            if tuple(lw[key].shape) != (K,):
                raise ValueError(f"{op}: layerwise[{key!r}] has shape {tuple(lw[key].shape)}, expected ({K},)")
        # (checkpoints written before rate_normalize existed used the rule "none")
        normalize = lw.get("rate_normalize", "none")
        ref_momentum = float(lw.get("rate_ref_momentum", rule.DEFAULT_REF_MOMENTUM))
        rule.check_rule_options(op, self.rate_momentum, self.gamma, self.s_min, self.s_max,
                                self.rate_eps, rate_normalize=normalize, ref_momentum=ref_momentum,
                                ref_momentum_name="rate_ref_momentum")
        reference = lw.get("rate_reference")
        if reference is not None and tuple(reference.shape) != (2, K):
            raise ValueError(f"{op}: layerwise['rate_reference'] has shape {tuple(reference.shape)}, expected (2, {K})")
        sd = {k: v for k, v in state_dict.items() if k != "layerwise"}
        sd["param_groups"] = [{k: v for k, v in g.items() if k != "layerwise"} for g in state_dict["param_groups"]]
        self._check_loaded_shapes(op, sd)
        source_ids = {id(v) for s in state_dict["state"].values() for v in s.values() if isinstance(v, torch.Tensor)}
        super().load_state_dict(sd)
        for i, g in enumerate(self.param_groups):
            self._check_layer(i, g.get("layer", "missing"), K)
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                st = self.state.get(p)
                for key, v in list(st.items()) if st else ():
                    if key in self._STATE_KEYS and v is not None:
                        v = st[key] = self._placed_state(op, gi, p, key, v)
                    if isinstance(v, torch.Tensor) and id(v) in source_ids:
                        st[key] = v.clone()
        self._version += 1
        dev = self._params_device() or self._factors.device
        if dev != self._factors.device:
            self._init_rate_state(dev)
        self._factors.copy_(lw["factors"])
        self._rates.copy_(lw["rates"])
        if reference is None:
            self._rate_ref.zero_()
        else:
            self._rate_ref.copy_(reference)
        self.rate_normalize, self.rate_ref_momentum = normalize, ref_momentum
        self._nonfinite.copy_(lw["nonfinite_steps"].reshape(()))
        skipped = lw.get("skipped_steps")  # (absent from checkpoints written before it existed)
        if skipped is None:
            self._skipped.zero_()
        else:
            self._skipped.copy_(skipped.reshape(()))
        self._unsettled = {}
        self.rate_momentum = float(lw["rate_momentum"])
        self.gamma = float(lw["gamma"])
        self.s_min = float(lw["s_min"])
        self.s_max = float(lw["s_max"])
        self.rate_eps = float(lw.get("rate_eps", self.rate_eps))

    # copy.deepcopy / pickle keep the layer-wise attributes too
    _EXTRA = ("_num_layers", "_device", "rate_momentum", "gamma", "s_min", "s_max", "rate_eps", "sync",
              "process_group", "_factors", "_nonfinite", "_skipped", "_rates", "_placeholder", "_version",
              "rate_normalize", "rate_ref_momentum", "_rate_ref")

    def __getstate__(self) -> Dict[str, Any]:
        if getattr(self, "_unsettled", None):
            self._settle(block=True)
        state = super().__getstate__()
        for k in self._EXTRA:
            if hasattr(self, k):
                state[k] = getattr(self, k)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # the work-list cache refers to the original's tensors: start a fresh one
        self._flat_key, self._flat, self._flat_params, self._work = None, [], [], None
        self._source, self._unsettled, self._zero_fresh = None, {}, False  # a copy is not attached
        if not hasattr(self, "_skipped"):
            self._skipped = torch.zeros((), dtype=torch.int64, device=self._factors.device)
        if not hasattr(self, "_rate_ref"):  # pickled before rate_normalize existed: the rule "none"
            self.rate_normalize, self.rate_ref_momentum = "none", rule.DEFAULT_REF_MOMENTUM
            self._rate_ref = rule.new_reference_state(self._num_layers, torch.float32, self._factors.device)
