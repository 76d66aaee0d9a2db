"""Layer-wise optimizers: ``LayerwiseSGD`` and ``LayerwiseAdamW`` (SPEC sections 4-5).

One parameter group per matched layer (``"layer": j`` with ``j`` in ``0..K-1``) plus the head
group (``"layer": None``, factor 1).  ``opt.step(discrepancies)`` first updates the per-layer
factors ``m`` with the rule of :mod:`lwkd_fast.rule` on the device, then updates every parameter
of every group in ONE fused pass in which each tensor reads its rate from device memory::

    eta_g = group["lr"] * m[group["layer"]]      (rounded to float32, the dtype of m)
    eta_g = group["lr"]                          (head group, layer None)

and applies exactly ``torch.optim.SGD`` / ``torch.optim.AdamW`` with ``lr = eta_g``.

Learning-rate schedulers
    ``param_groups[i]["lr"]`` is the *base* rate ``eta0`` of the group (the user's schedule);
    the layer factor is applied on top of it and never written back.  Any
    ``torch.optim.lr_scheduler`` therefore works unchanged: it reads and writes
    ``group["lr"]`` (float or 0-dim tensor) exactly as for ``torch.optim.SGD``, and chainable
    schedulers do not compound the factors.  ``opt.rates`` is the (K,) device tensor of the
    rates the last step applied, ``eta_j = lr_j * m_j`` with ``lr_j`` the base rate of the
    first group of layer ``j`` (all groups of a layer normally share it).

State layout (``opt.state[p]``, torch's names so checkpoints read the same)
    SGD:   ``momentum_buffer`` (only for groups with ``momentum != 0``);
    AdamW: ``step`` (0-dim float32 **on the parameter's device**), ``exp_avg``,
           ``exp_avg_sq`` and, with amsgrad, ``max_exp_avg_sq``; all in the parameter's dtype.
    ``state_dict()["layerwise"]`` holds the factors ``m``, the rule's running reference
    ``rate_reference`` ((2, K), used by ``rate_normalize="running"``), the last ``rates``, the
    on-device ``nonfinite_steps`` and ``skipped_steps`` counters and the rule's hyper-parameters
    (checkpoints written before ``skipped_steps`` existed load with it at 0, those written before
    ``rate_normalize`` existed with the rule ``"none"``).  Checkpoints contain only
    tensors, numbers, strings, None, tuples, lists and dicts, so they load with
    ``torch.load(..., weights_only=True)``; resuming is bit-identical.  As with torch.optim,
    ``state_dict()`` returns references to the live tensors: save (or deep-copy) it before the
    next step.

Skipping a step (non-finite loss, fp16 overflow) without a host synchronisation
    ``opt.step(discrepancies, found_inf=flag)`` with ``flag`` a 0-dim float32 tensor on the
    parameters' device (e.g. ``(~torch.isfinite(loss)).float()``, or torch.amp's found_inf).
    When it is nonzero the step is skipped ON THE DEVICE (apex's skip-flag pattern): no
    parameter, no optimizer state (momentum buffers, ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq``, AdamW step counts) and no rule state (factors ``m``, the running
    reference, the non-finite counter, ``rates``) changes -- the run is bit-identical to one that
    never called ``step()`` there -- and ``opt.skipped_steps`` (0-dim int64 device tensor, in the checkpoint) counts it.
    The kernels read the flag themselves, so a skipped step costs next to nothing and a
    ``found_inf`` of None costs nothing at all.  State a skipped step had to create for
    parameters seen for the first time (AdamW zeros; SGD momentum buffers, whose first update is
    ``buf = g`` in torch) is tracked until the host learns the flag without waiting, and dropped
    if it never got initialised, so even a skipped *first* step is exact.  With
    ``sync="all_reduce"`` the flag is all-reduced with the discrepancies (one collective), so a
    non-finite loss on any rank skips the step on every rank; every rank all-reduces the same K + 1
    values whether or not it passes a flag, so ranks that differ in passing one cannot diverge.

Discrepancy sources (KD frameworks call ``optimizer.step()`` with no arguments)
    ``opt.attach(source)``: ``source`` is any object with ``latest_discrepancies`` ((K,) tensor
    or None) and ``found_inf`` (0-dim tensor or None), e.g. a ``LayerwiseDistiller`` (its
    ``make_optimizer`` attaches itself).  ``opt.step()`` then uses
    ``source.latest_discrepancies``, and ``source.found_inf`` whenever no ``found_inf`` is
    passed; ``opt.detach_source()`` undoes it.  Without a source, ``step()`` needs its
    ``discrepancies``.

Parameters as torch.optim takes them (SPEC section 5)
    * Every state tensor is checked against its parameter (shape, dtype, DTensor placements)
      when the work list is built and by ``load_state_dict`` before anything is loaded; a
      mismatch (another model's checkpoint, ``p.data`` resized or re-typed between steps) raises
      naming ``param_groups[g]['params'][i]``, the state key and both shapes.  Device and memory
      layout follow the parameter.
    * The rate state follows the parameters' device: built before ``model.cuda()``, it moves at
      the next step (asynchronously); ``load_state_dict`` places state like torch.optim.
    * Non-dense parameters (strided slices used as leaves) are updated through a dense working
      copy inside the step.
    * DTensor parameters (FSDP2): the step runs on the local shards, one fused call, the rates
      replicated; sharded parameters need ``sync="all_reduce"``.  ``state_dict()`` also puts the
      ``"layerwise"`` record into ``param_groups[0]`` for torch.distributed.checkpoint's
      ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, and a step whose every base
      rate is 0 needs no discrepancies (how those helpers create a fresh optimizer's state).

No host synchronisation: ``step()`` reads no device value on the host (``.item()``,
``.cpu()``, ``.tolist()``, ``bool(tensor)``); all decisions use host metadata (shapes, dtypes,
which parameters have a gradient).  Parameters whose ``grad`` is None are skipped and their
state is untouched, as in torch.

Backends of the two step ops ``"layerwise_sgd_step"`` and ``"layerwise_adamw_step"`` (named
per-group hyper-parameter lists, see csrc/ops.cpp): ``native`` (``torch.ops.lwkd.layerwise_*_step``:
C++ CPU work list under ``at::parallel_for``; CUDA multi-tensor apply), ``triton``
(:mod:`lwkd_fast.triton.optim`, a pointer-table kernel) and ``reference`` (:mod:`.reference`, built
on ``torch._foreach_*``).  All take the same arguments, the optional skip flag ``found_inf``
last (native CPU: read from host memory, early return; CUDA: every kernel -- the rule, the
step-count bump, the step -- reads the device flag first and returns; Triton: the flag is loaded
in the kernel and folded into every load/store mask; reference: ``torch.where`` with saved copies).

The package, one concern a file (docs/ARCHITECTURE.md): :mod:`.base` (construction, the rule's
state, the step) with its mixins :mod:`.groups`, :mod:`.placement`, :mod:`.skipping` and
:mod:`.checkpoint`; :mod:`.sgd` and :mod:`.adamw` (the two optimizers); :mod:`.worklist` (the work
list a step hands to the op); :mod:`.step_op` (the ops' names and their backend call; their fakes are in lwkd_fast.registry);
:mod:`.reference` (the ``torch._foreach_*`` backend); :mod:`.tensors` (DTensor / layout helpers);
``lwkd-fast check``'s cases of the step are in lwkd_fast.check.step.  Every name lives here as it did when this was one
module: the public classes keep ``__module__ == "lwkd_fast.optim"``, so pickles name them as before.
"""

from __future__ import annotations

_EAGER_HOST_READ = True  # learn skip flags on the host as soon as that costs no wait (tests turn it off)

from .adamw import LayerwiseAdamW  # noqa: E402
from .base import DEFAULT_RATE_NORMALIZE, _SYNC_CHOICES, _LayerwiseOptimizer  # noqa: E402
from .reference import _group_rate, _scale, reference_adamw_step, reference_sgd_step  # noqa: E402
from .sgd import LayerwiseSGD  # noqa: E402
from .skipping import _Unsettled  # noqa: E402
from .step_op import ADAMW_OP, OPS, SGD_OP, _run_step  # noqa: E402
from .tensors import (_describe, _dtensor_type, _is_dense, _is_dtensor, _is_number, _local,  # noqa: E402
                      _same_layout, _scalar_on, _work_layout)
from .worklist import _WorkList  # noqa: E402

__all__ = ["LayerwiseSGD", "LayerwiseAdamW", "reference_sgd_step", "reference_adamw_step"]
