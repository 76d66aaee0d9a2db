"""RepDistiller-style criteria: ``LayerwiseAttention``.

RepDistiller's criteria (``distiller_zoo``) are modules called as ``criterion_kd(g_s, g_t)`` with
the student's and teacher's lists of intermediate features, returning one loss per layer, which
the training loop sums (``loss_kd = sum(loss_group)``).  ``LayerwiseAttention`` has that interface
and RepDistiller ``Attention``'s numbers (``metric="at"``: ``(at(f_s) - at(f_t)).pow(2).mean()``
per layer, with the larger spatial map average-pooled to the smaller one), but all K layers run in
one :func:`lwkd_fast.attention_discrepancy` call, and the (K,) tensor D is kept for the layer-wise
rates (``latest_discrepancies``, a discrepancy source for ``opt.attach``).

In a RepDistiller training loop (``train_student.py``, ``--distill attention``)::

    from lwkd_fast.integrations import make_layerwise_optimizer
    from lwkd_fast.integrations.repdistiller import LayerwiseAttention

    criterion_kd = LayerwiseAttention()                       # instead of distiller_zoo.Attention()
    optimizer = make_layerwise_optimizer(
        "sgd", model_s, ["layer1", "layer2", "layer3"], torch.zeros(2, 3, 32, 32), lr=0.05,
        momentum=0.9, weight_decay=5e-4, source=criterion_kd)  # the modules behind feat_s[1:-1]
    ...
    loss_group = criterion_kd(feat_s[1:-1], [f.detach() for f in feat_t[1:-1]])
    loss_kd = sum(loss_group)
    loss = opt.gamma * loss_cls + opt.alpha * loss_div + opt.beta * loss_kd  # opt: RepDistiller's args
    optimizer.zero_grad(); loss.backward(); optimizer.step()  # rates from the latest D

``criterion_kd.observe_loss(loss)`` before ``step()`` makes a non-finite total loss skip the
update (by default only a non-finite matching term does).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .. import ops
from . import DiscrepancySource

__all__ = ["LayerwiseAttention"]


class LayerwiseAttention(DiscrepancySource, nn.Module):
    """``forward(g_s, g_t) -> [loss_0, ..., loss_{K-1}]`` (0-dim tensors), from one fused op.

    Args:
        p, metric, beta, normalize, tau, eps: as for :func:`lwkd_fast.attention_discrepancy`
            (``metric="at"``, ``p=2`` reproduce RepDistiller's ``Attention`` criterion).
        resize: ``"pool"`` (default, RepDistiller's behaviour: the larger spatial map is
            average-pooled to the smaller) or None (mismatched sizes are an error).
        use: ``"rates+loss"`` (default: the list is the matching loss, differentiable into the
            student features) or ``"rates"`` (D only steers the rates; the list holds zeros that
            support ``backward``, so the training loop stays unchanged).

    After each call ``latest_discrepancies`` is the (K,) tensor D (detached) and ``found_inf`` the
    non-finite flag of this criterion's loss (``rates+loss``) or None (``rates``).
    """

    def __init__(self, p: float = 2.0, *, metric: str = "at", beta: float = 0.5, normalize: str = "sum",
                 tau: float = 1.0, resize: Optional[str] = "pool", use: str = "rates+loss", eps: float = 1e-12) -> None:
        super().__init__()
        if use not in ("rates", "rates+loss"):
            raise ValueError(f"LayerwiseAttention: unknown use {use!r}; expected 'rates' or 'rates+loss'")
        self.p, self.metric, self.beta, self.normalize = float(p), metric, float(beta), normalize
        self.tau, self.resize, self.use, self.eps = float(tau), resize, use, float(eps)
        self.latest_discrepancies = None
        self.found_inf = None

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        g_s, g_t = list(g_s), list(g_t)
        if len(g_s) != len(g_t):
            raise ValueError(f"LayerwiseAttention: got {len(g_s)} student features but {len(g_t)} teacher features")
        with_loss = self.use == "rates+loss"
        s = g_s if with_loss else [f.detach() for f in g_s]
        t = [f.detach() for f in g_t]
        D = ops.attention_discrepancy(s, t, p=self.p, metric=self.metric, beta=self.beta, normalize=self.normalize,
                                      tau=self.tau, resize=self.resize, eps=self.eps)
        if with_loss:
            self._publish(D, D.detach().sum())
            return list(D.unbind(0))
        self._publish(D, None)
        return [torch.zeros((), dtype=D.dtype, device=D.device, requires_grad=True) for _ in range(D.numel())]

    def extra_repr(self) -> str:
        return f"p={self.p}, metric={self.metric!r}, resize={self.resize!r}, use={self.use!r}"
