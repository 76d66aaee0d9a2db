"""State created on a step that may have been skipped.

The device decides whether a step with `found_inf` ran; the host, which must not wait for
it, still has to create state for parameters seen for the first time (AdamW moments, SGD
momentum buffers).  Such entries are "unsettled": a device flag says whether every step
they took part in was skipped (then they are still uninitialised).  AdamW's initial state
(zeros, step 0) is exact either way; an SGD buffer is not (torch's first step sets
buf = g), so while unsettled the step runs its tensors twice, once as fresh and once as
continuing, each call skipped on the device unless it is the right one (_split_step).
The host learns the flag without waiting (CPU: at once; CUDA: a pinned copy and an event)
and then drops never-initialised entries (torch would have none), so state_dict() matches
the run without the skipped steps.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .worklist import _WorkList


def _eager_host_read() -> bool:
    """The switch ``lwkd_fast.optim._EAGER_HOST_READ``: learn skip flags on the host as soon as that
    costs no wait.  Read from the package at call time (tests turn it off there)."""
    return importlib.import_module(__package__)._EAGER_HOST_READ


class _Unsettled:
    """Whether state entries created on a possibly skipped step are still uninitialised: a
    0-dim bool device flag (True: every step they took part in was skipped), and its value on
    the host once that is known without waiting -- at once on the CPU (host memory, read
    through a numpy view rather than a tensor method), after a pinned copy's event on CUDA."""

    __slots__ = ("flag", "_np", "_host", "_event")

    def __init__(self, flag: torch.Tensor) -> None:
        self.flag = flag
        self._np = self._host = self._event = None
        if not _eager_host_read():
            return
        if flag.device.type == "cpu":
            self._np = np.zeros((), dtype=np.bool_)
            torch.from_numpy(self._np).copy_(flag)
        elif flag.device.type == "cuda":
            # the copy runs on the current stream of the flag's device, which need not be the
            # current device: the event is recorded on that same stream
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flag.device))

    def value(self, block: bool = False) -> Optional[bool]:
        """True / False once known; None while the device has not got there (``block``: wait)."""
        if self._np is not None:
            return bool(self._np)
        if self._event is not None and (block or self._event.query()):
            self._event.synchronize()  # (returns at once after a successful query)
            return bool(self._host)
        if block:
            return bool(self.flag)  # a host synchronisation: checkpoints only
        return None


class _SkipTracking:
    """Mixin of :class:`~lwkd_fast.optim.base._LayerwiseOptimizer`: the unsettled entries
    ``self._unsettled`` (parameter -> :class:`_Unsettled`)."""


    def _settle(self, block: bool = False) -> None:
        """Drop unsettled entries whose flag is known (``block=True``: wait for it)."""
        done: Dict[int, Optional[bool]] = {}
        dropped = False
        for p, u in list(self._unsettled.items()):
            if id(u) not in done:
                done[id(u)] = u.value(block)
            uninit = done[id(u)]
            if uninit is None:
                continue
            del self._unsettled[p]
            if uninit:
                st = self.state.get(p)
                if st is not None:
                    if self._algorithm == "sgd":
                        st.pop("momentum_buffer", None)
                    else:
                        st.clear()
                    if not st:
                        del self.state[p]
                dropped = True
        if dropped:
            self._version += 1  # the cached work list refers to dropped state

    def _track(self, work: "_WorkList", created: List[torch.Tensor], skip: Optional[torch.Tensor]) -> None:
        """After a step: entries created now (with a skip flag) become unsettled; unsettled
        entries that took part are initialised unless this step was skipped too."""
        new: Dict[int, _Unsettled] = {}
        unsettled = self._unsettled
        if unsettled:
            sgd = self._algorithm == "sgd"
            for i, p in enumerate(work.owners):
                u = unsettled.get(p)
                if u is None or (sgd and (not work.s1 or work.s1[i] is self._placeholder)):
                    continue  # (an SGD tensor whose group has no momentum now leaves its buffer alone)
                if skip is None:  # this step certainly ran: the entry is initialised
                    del unsettled[p]
                    continue
                if id(u) not in new:
                    new[id(u)] = _Unsettled(u.flag & skip)
                unsettled[p] = new[id(u)]
        if created and skip is not None:
            fresh = _Unsettled(skip.clone())
            for p in created:
                unsettled[p] = fresh
        if unsettled and _eager_host_read():
            self._settle()

    def _split_step(self, backend, work: "_WorkList", params, grads, groups_args, fi, skip) -> None:
        """SGD step while some momentum buffers are unsettled: those tensors run in two calls,
        as fresh (``buf = g``) and as continuing, and the device skips the wrong one."""
        rest: List[int] = []
        cohorts: Dict[int, Tuple[_Unsettled, List[int]]] = {}
        fresh_set = set(work.fresh)
        for i, p in enumerate(work.owners):
            u = self._unsettled.get(p)
            if u is None or i in fresh_set or work.s1[i] is self._placeholder:
                rest.append(i)
            else:
                cohorts.setdefault(id(u), (u, []))[1].append(i)

        def call(idx, fresh, flag):
            pos = {i: k for k, i in enumerate(idx)}
            self._sgd_call(backend, [params[i] for i in idx], [grads[i] for i in idx], [work.s1[i] for i in idx],
                           [work.tgroup[i] for i in idx], [pos[i] for i in fresh], groups_args, flag)

        if rest:
            call(rest, [i for i in rest if i in fresh_set], fi)
        for u, idx in cohorts.values():
            as_fresh = ~u.flag if skip is None else (~u.flag) | skip       # skip unless still uninitialised
            as_continuing = u.flag if skip is None else u.flag | skip       # skip unless initialised
            call(idx, idx, as_fresh.to(torch.float32))
            call(idx, [], as_continuing.to(torch.float32))
