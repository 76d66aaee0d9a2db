"""RepDistiller adapter: ``LayerwiseAttention`` (a criterion) and ``feature_layers``.

RepDistiller's criteria (``distiller_zoo``) are modules called as ``criterion_kd(g_s, g_t)`` with
the student's and teacher's lists of intermediate features, returning one loss per layer, which
the training loop sums (``loss_kd = sum(loss_group)``).  ``LayerwiseAttention`` has that interface
and RepDistiller ``Attention``'s numbers (``metric="at"``: ``(at(f_s) - at(f_t)).pow(2).mean()``
per layer, with the larger spatial map average-pooled to the smaller one), but all K layers run in
one :func:`lwkd_fast.attention_discrepancy` call, and the (K,) tensor D is kept for the layer-wise
rates (``latest_discrepancies``, a discrepancy source for ``opt.attach``).

Recipe: ``python train_student.py --path_t <teacher.pth> --distill attention --model_s resnet8x4
-a 0 -b 1000``, RepDistiller's own entry point, with three edits to ``train_student.py``.  Among
its imports::

    from lwkd_fast.integrations.repdistiller import LayerwiseAttention, feature_layers, make_layerwise_optimizer

in ``main()``, the attention branch::

    elif opt.distill == 'attention':
        criterion_kd = LayerwiseAttention()

and the optimizer (``data`` is the ``torch.randn(2, 3, 32, 32)`` batch ``main()`` already builds;
``feature_layers`` names the student modules behind ``feat_s[1:-1]``, e.g. layer1..layer3 of a
ResNet, block1..block3 of a WRN)::

    optimizer = make_layerwise_optimizer("sgd", model_s, feature_layers(model_s, data), data,
                                         lr=opt.learning_rate, momentum=opt.momentum,
                                         weight_decay=opt.weight_decay, source=criterion_kd)

Nothing else changes: ``helper/loops.py`` sums the per-layer list and calls
``optimizer.step()``, which reads the latest D from the criterion; ``adjust_learning_rate``
writes every group's ``lr`` (the base rate); ``module_list.cuda()`` after the optimizer is built
is fine (the rate state follows the parameters at the first step).  ``opt.beta`` (1000 for
attention) scales the loss as for ``Attention``, so at ``p = 2`` the loss is exactly
RepDistiller's.  ``criterion_kd.observe_loss(loss)`` before ``step()`` makes a non-finite total
loss skip the update (by default only a non-finite matching term does).

Attention maps use ``|A|^p`` (Zagoruyko & Komodakis' definition, SPEC section 1); RepDistiller's
``Attention`` uses ``f.pow(p)``.  They agree for even ``p`` (the default 2) and for non-negative
features (``feat_s`` are post-ReLU); for odd ``p`` on signed (pre-activation, ``preact=True``)
features they differ.  This package keeps ``|A|^p``: ``A^p`` of a signed map is not an attention
(its mass can cancel).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from .. import ops
from . import DiscrepancySource, make_layerwise_optimizer, producing_modules

__all__ = ["LayerwiseAttention", "feature_layers", "make_layerwise_optimizer"]


def feature_layers(model: nn.Module, x: torch.Tensor, indices: Optional[Sequence[int]] = None) -> List[str]:
    """Names of the sub-modules of a RepDistiller model whose outputs are the features
    ``model(x, is_feat=True)[0][i]`` for ``i`` in ``indices`` (default: ``1 .. len - 2``, the
    ``feat_s[1:-1]`` that ``--distill attention`` matches), found by tensor identity on one
    forward pass (eval mode, no gradients, the model's flags restored)."""
    op = "feature_layers"

    def pick(out):
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], (list, tuple))):
            raise TypeError(f"{op}: model(x, is_feat=True) must return (feats, logits) with feats a list, as "
                            f"RepDistiller's models do; got {type(out).__name__}")
        feats = out[0]
        idx = range(1, len(feats) - 1) if indices is None else indices
        return [(f"feat[{i}]", feats[i]) for i in idx]

    return producing_modules(op, model, lambda m: m(x, is_feat=True), pick)


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
