"""Per-layer input Jacobians and Hessian-vector products of a model (SPEC section 3).

For K named layers j of a model and a batch x of B samples this module computes, for every
sample b, the derivative of a scalar *probe* ``phi_j(x)_b`` of layer j's activation with respect
to that sample's input ``x_b``:

* Jacobian map  ``J_j[b] = d phi_j(x)_b / d x_b``                         (:func:`input_jacobians`)
* HVP map       ``H_j[b] = d/dx_b < grad_{x_b} phi_j(x)_b , v_b >``         (:func:`input_hvps`)

Each map has the shape of x, ``(B, *x.shape[1:])``.  :func:`derivative_maps` computes the maps of
a student and a teacher together on one x (and, for HVPs, one Rademacher v).  x may be a dict of
keyword arguments (``model(**x)``, e.g. Hugging Face inputs) of which one floating-point entry is
differentiated (``wrt``); :func:`sketched_derivative_maps` gives language models, whose only
shared input is the one-hot tokens, maps projected on a shared random sketch of the vocabulary.
A layer is a module name, or ``(name, index)`` for one element of a tuple/dict output.

Probes (``probe=``): ``"energy"`` (default) ``sum_i a_j[b, i]``, the mass of the attention map
``a = (1/C) sum_c |A|^p`` (``p=2``, channels on ``channel_dim=1``; ``channel_dim=-1`` for token
layouts (B, N, D)); ``"max"`` ``max_i a_j[b, i]``; ``"logit"`` the activation's entry of the label
class (``labels`` needed; meant for the output layer, e.g. the classifier or ``""``, the model
itself); or any callable ``(activation, labels) -> (B,)``.  A list gives one probe per layer.

Per-sample semantics
--------------------
``J_j[b]`` is the derivative of sample b's probe with respect to sample b's input only.  While the
maps are computed (a "map session"), the model runs in a state in which samples do not interact
and nothing is random:

* every BatchNorm layer that would normalise with batch statistics (train mode, or
  ``track_running_stats=False``) normalises with the mean and the *biased* variance of the
  current batch, held as constants (``F.batch_norm(..., training=False)`` with detached
  statistics).  Its running statistics are not updated.  The per-sample strategies (``vmap``,
  ``loop``, and ``batched_backward`` with ``chunk_size``) first run the whole batch once without
  a graph to record those statistics, then replay them, so every strategy differentiates the
  same function: the model in eval mode with each such BatchNorm's running statistics set to the
  batch's statistics.  (SyncBatchNorm is treated the same way, with the statistics of the local
  batch.)
  The statistics reach each such layer as its running statistics (set by a forward pre-hook) while
  the layer runs in eval mode, so BatchNorm subclasses with fused extras (timm's
  ``BatchNormAct2d``) keep their own forward.
* nothing is random: every module runs in eval mode, which turns off dropout, attention
  dropout gated by the attention module's own flag (timm fused attention, Hugging Face eager and
  sdpa attention), stochastic depth (timm ``DropPath``, torchvision ``StochasticDepth``) and any
  other train-only behaviour; train-mode InstanceNorm keeps instance statistics and does not
  update its running statistics.  (Randomness a forward draws regardless of ``training`` cannot
  be turned off.)
* after the session every hook, patched forward, training flag and swapped buffer is restored,
  and any buffer that a module nevertheless changed in place is copied back: computing maps
  leaves the model's state (running statistics, ``num_batches_tracked``) exactly as it was.

The session patches module attributes, so one model must not be used by two threads at once
while its maps are computed.  A layer that runs more than once in a forward contributes its last
output; what a layer contributes is what it returned (a copy, so later in-place operations of
the forward do not change it).  Second derivatives through an op torch differentiates only once
(``nn.Hardsigmoid``) raise :class:`NotDifferentiableError` naming the modules, up front for
Jacobian losses; :func:`replace_hardsigmoid` swaps in the exact ``relu6`` form.

Strategies
----------
``"batched_backward"``  one forward of the batch, then per layer one reverse pass of
    ``sum_b phi_j(x)_b`` (each pass only as deep as its layer) gives all B per-sample gradients at
    once, exact because samples are independent under the session.  HVPs add a second reverse
    pass of ``sum_b <g_b, v_b>``.  Merging the K passes into one with ``is_grads_batched`` was
    measured and is slower on CPU: a merged pass does K x full-depth work, the separate passes
    only sum-of-depths.  ``chunk_size`` bounds memory by processing that many samples at a time.
``"vmap"``  ``torch.func.vmap`` over samples (optionally chunked with ``chunk_size``) of a
    per-sample function: Jacobians by one ``vjp`` and one pullback per layer, HVPs by
    ``grad`` of ``<grad phi_j, v>`` per layer (reverse-over-reverse).  Forward-over-reverse
    (``jvp`` of ``jacrev``) and ``jacrev`` over the K probes were measured slower on CPU, and
    forward-mode AD is missing for some backward ops (e.g. ``silu_backward``).  Only plain torch
    code runs inside the transforms (the project's custom ops do not compose with ``torch.func``).
``"loop"``  one sample at a time, one plain ``torch.autograd.grad`` per layer: the oracle.
``"auto"``  the fastest exact strategy, ``"batched_backward"``.

Second derivatives (HVPs, or ``create_graph=True``) and the ``vmap`` strategy run with the math
backend of ``scaled_dot_product_attention``: the fused attention kernels have no double backward
and no ``vmap`` batching rule.

``create_graph=False`` (the default, always for a teacher) returns maps without a graph.
``create_graph=True`` returns maps that are differentiable with respect to the model's
parameters (and to x, when x itself requires grad), so a discrepancy of them can be a loss.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops, reference

__all__ = [
    "PROBES",
    "STRATEGIES",
    "NotDifferentiableError",
    "Relu6Hardsigmoid",
    "UnknownLayerError",
    "count_sketch",
    "derivative_maps",
    "input_hvps",
    "input_jacobians",
    "rademacher",
    "replace_hardsigmoid",
    "select_output",
    "sketched_derivative_maps",
]

STRATEGIES = ("auto", "batched_backward", "vmap", "loop")
PROBES = ("energy", "max", "logit")

ProbeFn = Callable[[object, Optional[torch.Tensor]], torch.Tensor]
ProbeArg = Union[str, ProbeFn, Sequence[Union[str, ProbeFn]]]
# a layer: a module name, or (module name, index) for element `index` of a tuple/list output or
# entry `index` of a dict/ModelOutput output
Tap = Tuple[str, Optional[Union[int, str]]]
Layer = Union[str, Tuple[str, Union[int, str]]]
Layers = Union[Layer, Sequence[Layer]]
ChannelDims = Union[int, Sequence[int]]


class UnknownLayerError(KeyError, ValueError, AttributeError):
    """A requested layer name is not a module name of the model (``model.named_modules()``).

    The message lists the names that exist.  Subclasses :class:`KeyError` and :class:`ValueError`,
    and :class:`AttributeError` (what ``nn.Module.get_submodule`` raises), so code catching any of
    them sees it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NotDifferentiableError(TypeError, ValueError, RuntimeError):
    """The input cannot be differentiated (integer/bool dtype, or autograd is disabled by
    ``torch.inference_mode``).  Subclasses :class:`TypeError` and :class:`ValueError`, and
    :class:`RuntimeError` (what torch raises for ``requires_grad_`` on an integer tensor)."""


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _shape(x) -> Tuple[int, ...]:
    return tuple(x.shape)


def _check_model(op: str, name: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{op}: {name} must be a torch.nn.Module, got {type(model).__name__}")


def _check_input(op: str, x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise NotDifferentiableError(
            f"{op}: {name} has dtype {x.dtype} (shape {_shape(x)}), which does not allow gradients; "
            "derivative maps need a floating-point input (float16, bfloat16, float32 or float64)"
        )
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{op}: {name} must be a batch (B, ...) with B >= 1, got shape {_shape(x)}")
    if torch.is_inference_mode_enabled():
        raise NotDifferentiableError(
            f"{op}: cannot differentiate inside torch.inference_mode(); call it outside (torch.no_grad() "
            "around the call is fine: the maps enable gradients internally)"
        )


def _check_strategy(op: str, strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"{op}: unknown strategy {strategy!r}; expected one of {', '.join(map(repr, STRATEGIES))}")
    return "batched_backward" if strategy == "auto" else strategy


def _check_chunk(op: str, chunk_size) -> Optional[int]:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be None or a positive int, got {chunk_size!r}")
    return chunk_size


def _as_tap(layer, keys: bool = True) -> Optional[Tap]:
    """``(name, index)`` of a layer given as a name or a (name, index) tuple (index an int, None,
    or -- with ``keys`` -- a dict key), else None."""
    if isinstance(layer, str):
        return (layer, None)
    if isinstance(layer, tuple) and len(layer) == 2 and isinstance(layer[0], str):
        index = layer[1]
        if index is None or (isinstance(index, int) and not isinstance(index, bool)) or (keys and isinstance(index, str)):
            return (layer[0], index)
    return None


def _layer_names(op: str, layers: Layers, arg: str = "layers") -> List[Tap]:
    """The layers as (module name, output index or None) taps.  A lone (name, int) tuple is one
    layer; a tuple of two names is two layers (string indices need the list form)."""
    one = _as_tap(layers, keys=False)
    if one is not None:
        return [one]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"{op}: {arg} must be a module name or a list of module names, got {type(layers).__name__}")
    taps = []
    for n in layers:
        tap = _as_tap(n)
        if tap is None:
            raise TypeError(f"{op}: {arg} must contain module names (str) or (name, output index) pairs, got "
                            f"{type(n).__name__} {n!r}")
        taps.append(tap)
    return taps


def tap_name(name: str, index=None) -> str:
    """How a layer is shown: ``"name"``, or ``"name[1]"`` for an output index."""
    return name if index is None else f"{name}[{index!r}]"


def select_output(out, index=None):
    """The tensor of a module output that a layer means: with ``index`` None the output itself
    when it is a tensor, else the first tensor of a tuple/list/dict (``ModelOutput``) output;
    otherwise ``out[index]``.  Returns ``out`` unchanged when there is no tensor to take."""
    if index is not None:
        try:
            return out[index]
        except (IndexError, KeyError, TypeError):
            return None
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    return out


def _resolve_layers(op: str, model: nn.Module, names: List[str], arg: str = "layers") -> Dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        avail = ", ".join(repr(n) for n in modules)
        raise UnknownLayerError(
            f"{op}: unknown layer name(s) {', '.join(map(repr, missing))} in {arg} of "
            f"{type(model).__name__}; available module names ('' is the model itself): {avail}"
        )
    return {n: modules[n] for n in names}


def _check_labels(op: str, labels, x: torch.Tensor, needed: bool) -> Optional[torch.Tensor]:
    if labels is None:
        if needed:
            raise ValueError(f"{op}: probe 'logit' needs labels, a (B,) integer tensor with B = {x.shape[0]}")
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.shape[:1] != x.shape[:1]:
        raise ValueError(
            f"{op}: labels has shape {_shape(labels)} but x has shape {_shape(x)}; "
            "labels need one entry per sample (first dimensions must agree)"
        )
    if needed and (labels.dim() != 1 or labels.is_floating_point() or labels.is_complex()):
        raise ValueError(f"{op}: probe 'logit' needs integer class labels of shape ({x.shape[0]},), got "
                         f"dtype {labels.dtype} shape {_shape(labels)}")
    return labels.to(x.device)


def _check_v(op: str, v, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{op}: v must be a torch.Tensor, got {type(v).__name__}")
    if _shape(v) != _shape(x):
        raise ValueError(f"{op}: v has shape {_shape(v)} but x has shape {_shape(x)}; v needs the shape of x")
    if not (v.is_floating_point() or v.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{op}: v has dtype {v.dtype}; expected a real (floating or integer) tensor")
    return v.detach().to(device=x.device, dtype=x.dtype)


def rademacher(shape: Sequence[int], *, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Rademacher (+1/-1 with probability 1/2 each) tensor of ``shape``.

    Drawn as ``2 * torch.randint(0, 2, shape, generator=generator) - 1`` on the generator's device
    (the default generator of ``device`` when ``generator`` is None), then moved to ``device`` and
    cast to ``dtype``.  The same generator state always gives the same tensor, which is how student
    and teacher share v.
    """
    shape = tuple(int(s) for s in shape)
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    r = torch.randint(0, 2, shape, generator=generator, device=gen_device)
    return (r * 2 - 1).to(device=device if device is not None else gen_device, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Inputs: a tensor x (``model(x)``) or a dict of keyword arguments (``model(**x)``)
# ------------------------------------------------------------------------------------------------


class _Caller:
    """Calls the model on the differentiated tensor: ``model(x)``, or ``model(**kwargs)`` with
    ``kwargs[key] = x`` for a dict input.  The dict's other tensors with the batch dimension
    travel in the per-sample extras (``aux["kw:" + name]``), so the per-sample strategies slice
    them with x; everything else is passed as given (``static``)."""

    def __init__(self, key: Optional[str] = None, static: Optional[Dict[str, object]] = None):
        self.key, self.static = key, dict(static or {})

    def __call__(self, model: nn.Module, x: torch.Tensor, aux: Dict[str, torch.Tensor]):
        if self.key is None:
            return model(x)
        kw = dict(self.static)
        kw.update({k[3:]: t for k, t in aux.items() if k.startswith("kw:")})
        kw[self.key] = x
        return model(**kw)


def _split_input(op: str, x, wrt: Optional[str]) -> Tuple[torch.Tensor, _Caller, Dict[str, torch.Tensor]]:
    """(differentiated tensor, caller, batched keyword tensors) of a tensor or dict input."""
    if isinstance(x, torch.Tensor):
        if wrt is not None:
            raise ValueError(f"{op}: wrt={wrt!r} names an entry of a dict input, but x is a tensor")
        _check_input(op, x)
        return x, _Caller(), {}
    if not isinstance(x, Mapping):
        raise TypeError(f"{op}: x must be a tensor (the model is called as model(x)) or a dict of keyword "
                        f"arguments (model(**x)), got {type(x).__name__}")
    floats = [k for k, t in x.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if wrt is None:
        if len(floats) != 1:
            entries = ", ".join(f"{k!r} {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                                for k, t in x.items())
            hint = ("pass wrt=<the entry to differentiate>" if floats else
                    "derivative maps need a floating-point input; for token ids use "
                    "lwkd_fast.derivatives.sketched_derivative_maps")
            raise ValueError(f"{op}: x is a dict with {len(floats)} floating-point tensors ({entries}); {hint}")
        wrt = floats[0]
    if wrt not in x:
        raise ValueError(f"{op}: wrt={wrt!r} is not an entry of x (entries: {', '.join(map(repr, x))})")
    xt = x[wrt]
    _check_input(op, xt, f"x[{wrt!r}]")
    B = xt.shape[0]
    batched = {f"kw:{k}": t for k, t in x.items()
               if k != wrt and isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == B}
    static = {k: t for k, t in x.items() if k != wrt and f"kw:{k}" not in batched}
    return xt, _Caller(wrt, static), batched


def _check_probe_masks(op: str, mask, K: int, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-layer (B, N) masks of valid activation locations as extras ``aux["mask<j>"]`` (bool)."""
    if mask is None:
        return {}
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask] * K
    if len(masks) != K:
        raise ValueError(f"{op}: got {len(masks)} masks for {K} layers; pass one mask or one (or None) per layer")
    out = {}
    for j, m in enumerate(masks):
        if m is None:
            continue
        m = ops.mask_as_bool(op, f"layer {j}: mask[{j}]", m)
        if m.dim() < 2 or m.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: mask[{j}] has shape {_shape(m)} but x has shape {_shape(x)}; a mask is "
                             "(B, N): one entry per location of that layer's activation")
        out[f"mask{j}"] = m.to(x.device).reshape(m.shape[0], -1)
    return out


# ------------------------------------------------------------------------------------------------
# Probes
# ------------------------------------------------------------------------------------------------


def _first_tensor(op: str, layer: str, act, probe: str) -> torch.Tensor:
    """The activation (what :func:`select_output` took from the module's output) as a floating
    tensor, else a clear error."""
    if not isinstance(act, torch.Tensor):
        raise TypeError(
            f"{op}: layer {layer!r} returned {type(act).__name__}; probe {probe!r} needs a tensor "
            "activation (pass a callable probe to handle other outputs)"
        )
    if not act.is_floating_point():
        raise TypeError(f"{op}: layer {layer!r} returned dtype {act.dtype}; probe {probe!r} needs a floating tensor")
    return act


def _attention_mass(op: str, layer: str, act, probe: str, p: float, channel_dim: int,
                    mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The attention map (n, N) of the activation, and the mask checked against its N."""
    a = _first_tensor(op, layer, act, probe)
    if a.dim() >= 2 and (not -a.dim() <= channel_dim < a.dim() or channel_dim % a.dim() == 0):
        raise ValueError(
            f"{op}: channel_dim={channel_dim} is not a channel dimension of layer {layer!r}'s activation "
            f"(shape {_shape(a)}); use channel_dim=1 for (B, C, *S) and channel_dim=-1 for (B, N, D)"
        )
    att = reference.attention_maps(a, p=p, channel_dim=channel_dim)
    if mask is not None and _shape(mask) != _shape(att):
        raise ValueError(f"{op}: the mask of layer {layer!r} has {mask.shape[-1]} locations but its activation "
                         f"(shape {_shape(a)}, channel_dim={channel_dim}) has {att.shape[-1]}")
    return att, mask


def _energy(att: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return att.sum(1) if mask is None else (att * mask.to(att.dtype)).sum(1)


def _max(att: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return att.amax(1)
    top = torch.where(mask, att, torch.full_like(att, float("-inf"))).amax(1)
    return torch.where(mask.any(1), top, torch.zeros_like(top))  # no valid location: 0


def _make_probe(op: str, probe, j: int, p: float, channel_dim: int) -> Tuple[str, Callable]:
    """(display name, fn(layer, activation, aux) -> (n,)) of layer j's probe."""
    if callable(probe) and not isinstance(probe, str):
        name = getattr(probe, "__name__", type(probe).__name__)
        return f"callable {name}", lambda layer, act, aux: probe(act, aux.get("labels"))
    if probe in ("energy", "max"):
        reduce = _energy if probe == "energy" else _max

        def mass(layer, act, aux):
            return reduce(*_attention_mass(op, layer, act, probe, p, channel_dim, aux.get(f"mask{j}")))

        return probe, mass
    if probe == "logit":
        def logit(layer, act, aux):
            a = _first_tensor(op, layer, act, "logit")
            if a.dim() != 2:
                raise ValueError(
                    f"{op}: probe 'logit' needs a (B, num_classes) activation, but layer {layer!r} returned "
                    f"shape {_shape(a)}; use it on the output layer (e.g. the classifier, or '' for the model)"
                )
            return a.gather(1, aux["labels"].reshape(-1, 1)).squeeze(1)

        return "logit", logit
    raise ValueError(f"{op}: unknown probe {probe!r}; expected one of {', '.join(map(repr, PROBES))} or a callable "
                     "(activation, labels) -> (B,)")


def _per_layer(op: str, arg: str, value, K: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != K:
            raise ValueError(f"{op}: got {len(value)} {arg} for {K} layers; pass one or one per layer")
        return list(value)
    return [value] * K


def _make_probes(op: str, probe: ProbeArg, K: int, p: float, channel_dim: ChannelDims):
    probes = _per_layer(op, "probes", probe, K)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"{op}: p must be a positive number, got {p!r}")
    cds = _per_layer(op, "channel dims", channel_dim, K)
    for cd in cds:
        if isinstance(cd, bool) or not isinstance(cd, int):
            raise TypeError(f"{op}: channel_dim must be an int or a list of ints (one per layer), got "
                            f"{type(cd).__name__}")
    made = [_make_probe(op, pr, j, float(p), cd) for j, (pr, cd) in enumerate(zip(probes, cds))]
    needs_labels = any(pr == "logit" for pr in probes if isinstance(pr, str))
    return made, needs_labels


# ------------------------------------------------------------------------------------------------
# The map session: frozen statistics, no randomness, hooks; everything restored afterwards
# ------------------------------------------------------------------------------------------------


def _uses_batch_stats(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)


def _batch_stats(inp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Detached per-channel mean and biased variance of a (N, C, *) BatchNorm input (float32 or
    wider, as BatchNorm accumulates).

    Two passes (the mean, then the mean of squared deviations): numerically as good as
    ``torch.var_mean`` and several times faster on CPU for NCHW inputs (measured)."""
    with torch.no_grad():
        t = inp.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        dims = [0] + list(range(2, t.dim()))
        mean = t.mean(dims, keepdim=True)
        var = (t - mean).square_().mean(dims)
    return mean.reshape(-1), var


def _check_input_dim(m: nn.Module, inp: torch.Tensor) -> None:
    """The module's own input-rank check (InstanceNorm2d wants 3-D or 4-D input, ...), when it has one."""
    try:
        m._check_input_dim(inp)
    except (AttributeError, NotImplementedError):  # a custom subclass without the check
        pass


class _Session:
    """Context manager that puts ``model`` in the per-sample state described in the module
    docstring and captures the outputs of the tapped layers.

    Every module is in eval mode for the session (no dropout, attention dropout, drop-path or any
    other train-only randomness); a BatchNorm layer that would use batch statistics gets, before
    each call, the statistics of its input as its running statistics (a forward pre-hook), so its
    own forward -- subclasses with fused activations included -- normalises with the batch's
    mean and biased variance held constant.  ``mode`` is ``"record"`` (compute and store the
    statistics of each call) or ``"replay"`` (reuse the recorded ones in call order).
    """

    def __init__(self, op: str, model: nn.Module, taps: List[Tap], modules: Dict[str, nn.Module],
                 caller: Optional[_Caller] = None, second_order: bool = False):
        self.op = op
        # second derivatives will be taken: modules torch differentiates only once that run
        # before the last tapped layer are an error (found now, not in a later backward)
        self.second_order = second_order
        self.once_differentiable: List[Tuple[str, str]] = []
        self.model = model
        self.taps = taps
        self.modules = modules
        self.caller = caller or _Caller()
        self.acts: Dict[int, object] = {}
        self.mode = "record"
        self.bn = [m for m in model.modules() if _uses_batch_stats(m)]
        self.recorded: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m in self.bn}
        self.cursor: Dict[int, int] = {}
        self._undo: List[Callable[[], None]] = []

    @property
    def needs_stats(self) -> bool:
        return bool(self.bn)

    # -- batch statistics as constants ------------------------------------------------------------

    def _bn_pre_hook(self, m: nn.modules.batchnorm._BatchNorm, like: Optional[torch.Tensor]):
        key = id(m)

        def pre(_mod, args):
            if self.mode == "record":
                mean, var = _batch_stats(args[0])
                if like is not None and like.dtype != mean.dtype:  # low-precision parameters
                    mean, var = mean.to(like.dtype), var.to(like.dtype)
                self.recorded[key].append((mean, var))
            else:
                i = self.cursor.get(key, 0)
                calls = self.recorded[key]
                if i >= len(calls):
                    raise RuntimeError(
                        f"{self.op}: a BatchNorm layer ran more often in a per-sample forward than in the "
                        "batch forward that recorded its statistics (data-dependent control flow?)"
                    )
                self.cursor[key] = i + 1
                mean, var = calls[i]
            m._buffers["running_mean"], m._buffers["running_var"] = mean, var

        return pre

    def _freeze_bn(self, m: nn.modules.batchnorm._BatchNorm) -> None:
        saved = (m._buffers["running_mean"], m._buffers["running_var"])

        def undo():
            m._buffers["running_mean"], m._buffers["running_var"] = saved

        self._undo.append(undo)
        like = saved[0] if saved[0] is not None else m.weight
        h = m.register_forward_pre_hook(self._bn_pre_hook(m, like))
        self._undo.append(h.remove)

    @staticmethod
    def _in_forward(m):
        def forward(inp: torch.Tensor) -> torch.Tensor:
            _check_input_dim(m, inp)
            return F.instance_norm(inp, None, None, m.weight, m.bias, True, 0.0, m.eps)

        return forward

    def _patch_forward(self, m: nn.Module, fn) -> None:
        had = "forward" in m.__dict__
        old = m.__dict__.get("forward")
        m.forward = fn

        def undo():
            if had:
                m.forward = old
            else:
                del m.forward

        self._undo.append(undo)

    def _hook(self, name: str):
        wanted = [(j, index) for j, (n, index) in enumerate(self.taps) if n == name]

        def hook(_mod, _inp, out):
            for j, index in wanted:
                t = select_output(out, index)
                # a copy: later in-place ops of the model (ReLU(inplace=True), out += identity)
                # must not change what the module returned
                self.acts[j] = t.clone() if isinstance(t, torch.Tensor) else t

        return hook

    def _once_hook(self, name: str, aten: str):
        def hook(mod, _inp, _out):
            if len(self.acts) < len(self.taps):  # upstream of a tapped layer
                self.once_differentiable.append((f"{name!r} ({type(mod).__name__})", aten))

        return hook

    # -- context protocol -------------------------------------------------------------------------

    def __enter__(self) -> "_Session":
        try:
            # copies of the buffers; at exit, version counters (no device sync) tell which ones a
            # module modified in place, and only those are copied back
            snapshot = [(b, b._version, b.detach().clone()) for b in self.model.buffers()]

            def restore_buffers():
                with torch.no_grad():
                    for b, version, old in snapshot:
                        if b._version != version and b.shape == old.shape:
                            b.copy_(old)

            self._undo.append(restore_buffers)
            bn_ids = {id(m) for m in self.bn}
            for m in self.model.modules():
                if id(m) in bn_ids:
                    self._freeze_bn(m)
                elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.training and m.track_running_stats:
                    self._patch_forward(m, self._in_forward(m))
                if m.training:  # no train-only behaviour anywhere: dropout, drop-path, ...
                    m.training = False
                    self._undo.append(lambda m=m: setattr(m, "training", True))
            for name in dict.fromkeys(n for n, _ in self.taps):
                h = self.modules[name].register_forward_hook(self._hook(name))
                self._undo.append(h.remove)
            if self.second_order:
                for name, m in self.model.named_modules():
                    aten = next((a for cls, a in _ONCE_DIFFERENTIABLE.items() if isinstance(m, cls)), None)
                    if aten is not None:
                        h = m.register_forward_hook(self._once_hook(name, aten))
                        self._undo.append(h.remove)
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._undo:
            self._undo.pop()()

    # -- one forward ------------------------------------------------------------------------------

    def record_stats(self, x: torch.Tensor, aux: Dict[str, torch.Tensor]) -> None:
        """Run the whole batch once without a graph to record the batch statistics, then switch to
        replaying them (used by the per-sample strategies)."""
        self.mode = "record"
        for lst in self.recorded.values():
            lst.clear()
        if self.needs_stats:
            with torch.no_grad():
                self.caller(self.model, x, aux)
        self.acts.clear()
        self.mode = "replay"

    def probes(self, x: torch.Tensor, aux: Dict[str, torch.Tensor], probe_fns) -> List[torch.Tensor]:
        """Forward ``x`` (n samples) and return each layer's probe, a (n,) tensor."""
        self.acts.clear()
        self.cursor.clear()
        if self.mode == "record":
            for lst in self.recorded.values():
                lst.clear()
        self.once_differentiable.clear()
        self.caller(self.model, x, aux)
        if self.once_differentiable:
            users = list(dict.fromkeys(u for u, _ in self.once_differentiable))
            raise _second_derivative_error(self.op, self.model, self.once_differentiable[0][1], users)
        n = x.shape[0]
        out = []
        for j, ((name, index), (pname, fn)) in enumerate(zip(self.taps, probe_fns)):
            if j not in self.acts:
                raise RuntimeError(f"{self.op}: layer {tap_name(name, index)!r} did not run in the forward pass "
                                   f"of {type(self.model).__name__} (its forward hook never fired)")
            act = self.acts[j]
            phi = fn(tap_name(name, index), act, aux)
            if not isinstance(phi, torch.Tensor) or _shape(phi) != (n,) or not phi.is_floating_point():
                got = f"shape {_shape(phi)} dtype {phi.dtype}" if isinstance(phi, torch.Tensor) else type(phi).__name__
                act_s = f"shape {_shape(act)}" if isinstance(act, torch.Tensor) else type(act).__name__
                raise ValueError(
                    f"{self.op}: probe {pname} returned {got} for layer {tap_name(name, index)!r} (activation "
                    f"{act_s}); a probe must return one floating value per sample, shape ({n},)"
                )
            out.append(phi)
        self.acts.clear()
        return out


@contextlib.contextmanager
def _math_attention(enabled: bool) -> Iterator[None]:
    """The math backend of scaled_dot_product_attention, for second derivatives (the fused
    attention kernels have no double backward) and under vmap (no batching rule)."""
    if not enabled:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------


def _leaf(x: torch.Tensor, keep_graph: bool) -> torch.Tensor:
    """The tensor to differentiate with respect to: x itself when the caller's graph through x must
    be kept (create_graph with x requiring grad), else a fresh leaf."""
    if keep_graph:
        return x
    t = x.detach()
    if t.is_inference():
        t = t.clone()
    return t.requires_grad_(True)


def _grad(out: torch.Tensor, inp: torch.Tensor, *, retain: bool, create: bool) -> torch.Tensor:
    if not out.requires_grad:  # the probe does not depend on the input at all
        return torch.zeros_like(inp)
    return torch.autograd.grad(out, inp, retain_graph=retain or create, create_graph=create,
                               materialize_grads=True)[0]


def _maps_from_probes(phis: List[torch.Tensor], xin: torch.Tensor, v: Optional[torch.Tensor],
                      create_graph: bool) -> List[torch.Tensor]:
    """Per-layer reverse passes over a batch (or a single sample) whose samples are independent."""
    K = len(phis)
    maps = []
    for j, phi in enumerate(phis):
        last = j == K - 1
        if v is None:
            maps.append(_grad(phi.sum(), xin, retain=not last, create=create_graph))
        else:
            g = _grad(phi.sum(), xin, retain=True, create=True)
            maps.append(_grad((g * v).sum(), xin, retain=not last, create=create_graph))
    return maps


def _rows(aux: Dict[str, torch.Tensor], s: int, e: int) -> Dict[str, torch.Tensor]:
    return {k: t[s:e] for k, t in aux.items()}


def _run_per_slice(sess: _Session, x, aux, v, probe_fns, create_graph, keep_graph, step):
    """Slices of ``step`` samples (1 for the loop), each one forward and K reverse passes."""
    sess.record_stats(x, aux)
    parts: List[List[torch.Tensor]] = []
    with torch.enable_grad():
        for s in range(0, x.shape[0], step):
            xin = _leaf(x[s:s + step], keep_graph)
            phis = sess.probes(xin, _rows(aux, s, s + step), probe_fns)
            parts.append(_maps_from_probes(phis, xin, None if v is None else v[s:s + step], create_graph))
    return [torch.cat([p[j] for p in parts]) for j in range(len(probe_fns))]


def _run_batched(sess: _Session, x, aux, v, probe_fns, create_graph, keep_graph, chunk):
    if chunk is not None and chunk < x.shape[0]:
        return _run_per_slice(sess, x, aux, v, probe_fns, create_graph, keep_graph, chunk)
    sess.mode = "record"
    with torch.enable_grad():
        xin = _leaf(x, keep_graph)
        phis = sess.probes(xin, aux, probe_fns)
        return _maps_from_probes(phis, xin, v, create_graph)


def _run_vmap(sess: _Session, x, aux, v, probe_fns, create_graph, chunk):
    from torch.func import grad, vjp, vmap

    sess.record_stats(x, aux)
    K = len(probe_fns)

    def per_sample(xb, auxb):
        phis = sess.probes(xb.unsqueeze(0), {k: t.unsqueeze(0) for k, t in auxb.items()}, probe_fns)
        return tuple(phi.reshape(()) for phi in phis)

    def jacobian_rows(xb, auxb):
        # one forward, then one pullback per layer (a one-hot cotangent over the K probes)
        out, pull = vjp(lambda z: per_sample(z, auxb), xb)
        rows = []
        for j in range(K):
            ct = tuple(torch.ones_like(o) if i == j else torch.zeros_like(o) for i, o in enumerate(out))
            rows.append(pull(ct)[0])
        return tuple(rows)

    def hvp_rows(xb, vb, auxb):
        # reverse-over-reverse per layer: d/dz < grad phi_j(z), v >
        rows = []
        for j in range(K):
            def gv(z, j=j):
                return (grad(lambda w: per_sample(w, auxb)[j])(z) * vb).sum()

            rows.append(grad(gv)(xb))
        return tuple(rows)

    if v is None:
        fn = vmap(jacobian_rows, in_dims=(0, 0), chunk_size=chunk, randomness="different")
        args = (x, aux)
    else:
        fn = vmap(hvp_rows, in_dims=(0, 0, 0), chunk_size=chunk, randomness="different")
        args = (x, v, aux)
    ctx = contextlib.nullcontext() if create_graph else torch.no_grad()
    with ctx:
        return list(fn(*args))  # K tensors (B, *sample shape)


_NO_DOUBLE_BACKWARD = re.compile(r"derivative for (aten::(\w+?)_backward\w*) is not implemented")
# modules whose op torch differentiates only once, with that op's backward
_ONCE_DIFFERENTIABLE = {nn.Hardsigmoid: "aten::hardsigmoid_backward"}


def _second_derivative_error(op: str, model: nn.Module, aten: str, users: List[str]) -> "NotDifferentiableError":
    """The error for an op torch cannot differentiate twice: the op, the modules that use it, and
    what to do."""
    base = aten.split("::")[-1].replace("_backward", "")
    shown = ", ".join(users[:6]) + (f" and {len(users) - 6} more" if len(users) > 6 else "")
    where = (f"used by {shown} of {type(model).__name__}" if users else
             f"called functionally (F.{base}) somewhere in {type(model).__name__}'s forward")
    fix = ("replace those modules by the exact twice-differentiable form relu6(x + 3) / 6: "
           "lwkd_fast.derivatives.replace_hardsigmoid(model) does it in place" if base == "hardsigmoid" else
           f"replace {base} by a twice-differentiable formula of the same function")
    return NotDifferentiableError(
        f"{op}: torch has no derivative of {aten} (the backward of {base} cannot be differentiated again), "
        f"{where}; Hessian-vector maps always need it, Jacobian maps when they are a training loss "
        f"(create_graph=True, LayerwiseDistiller(use='rates+loss')). To compute these maps, {fix}")


def _explain_missing_derivative(op: str, model: nn.Module, exc: RuntimeError):
    """:func:`_second_derivative_error` for torch's "derivative for aten::X is not implemented",
    None for any other error."""
    found = _NO_DOUBLE_BACKWARD.search(str(exc))
    if found is None:
        return None
    base = found.group(2).replace("_", "")
    users = [f"{n!r} ({type(m).__name__})" for n, m in model.named_modules() if base in type(m).__name__.lower()]
    return _second_derivative_error(op, model, found.group(1), users)


def _compute(op: str, model: nn.Module, x, layers: Layers, *, v: Optional[torch.Tensor], probe, labels,
             create_graph: bool, strategy: str, chunk_size, p: float, channel_dim: ChannelDims,
             layers_arg: str = "layers", wrt: Optional[str] = None, mask=None) -> List[torch.Tensor]:
    _check_model(op, "model", model)
    xt, caller, aux = _split_input(op, x, wrt)
    strat = _check_strategy(op, strategy)
    chunk = _check_chunk(op, chunk_size)
    taps = _layer_names(op, layers, layers_arg)
    modules = _resolve_layers(op, model, [n for n, _ in taps], layers_arg)
    probe_fns, needs_labels = _make_probes(op, probe, len(taps), p, channel_dim)
    labels = _check_labels(op, labels, xt, needs_labels)
    if labels is not None:
        aux["labels"] = labels
    aux.update(_check_probe_masks(op, mask, len(taps), xt))
    if not taps:
        return []
    create_graph = bool(create_graph)
    keep_graph = create_graph and xt.requires_grad
    # vmap: the math kernel also has batching rules (the fused CPU kernel falls back to a loop)
    math_attention = v is not None or create_graph or strat == "vmap"
    try:
        with _Session(op, model, taps, modules, caller, second_order=v is not None or create_graph) as sess, \
                _math_attention(math_attention):
            if strat == "batched_backward":
                maps = _run_batched(sess, xt, aux, v, probe_fns, create_graph, keep_graph, chunk)
            elif strat == "vmap":
                maps = _run_vmap(sess, xt, aux, v, probe_fns, create_graph, chunk)
            else:
                maps = _run_per_slice(sess, xt, aux, v, probe_fns, create_graph, keep_graph, 1)
    except RuntimeError as exc:
        clear = _explain_missing_derivative(op, model, exc)
        if clear is None:
            raise
        raise clear from exc
    if not create_graph:
        maps = [m.detach() for m in maps]
    return maps


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------

Inputs = Union[torch.Tensor, Mapping]


def input_jacobians(
    model: nn.Module,
    x: Inputs,
    layers: Layers,
    *,
    probe: ProbeArg = "energy",
    labels: Optional[torch.Tensor] = None,
    create_graph: bool = False,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    p: float = 2.0,
    channel_dim: ChannelDims = 1,
    wrt: Optional[str] = None,
    mask=None,
) -> List[torch.Tensor]:
    """Per-sample input Jacobian maps ``J_j[b] = d phi_j(x)_b / d x_b`` of the named layers.

    Args:
        model: any ``nn.Module``, called as ``model(x)`` (or ``model(**x)`` for a dict x): once
            for ``batched_backward``; the per-sample strategies (and ``chunk_size``) first run the
            whole batch once without a graph when the model has batch-statistics BatchNorm layers
            (module docstring).
        x: the batch (B, ...), floating point; or a dict of keyword arguments of which one
            floating-point entry (``wrt``; by default the only one) is differentiated and every
            other tensor with the batch dimension is sliced along with it (e.g.
            ``{"pixel_values": ..., "attention_mask": ...}``).  Gradients are taken with respect
            to a detached copy unless ``create_graph=True`` and it requires grad (then the maps
            also depend on whatever it depends on).
        layers: module names as ``model.named_modules()`` gives them ("" is the model itself), or
            one name; ``(name, index)`` takes element ``index`` of a tuple/list output (entry of a
            dict output) instead of its first tensor.
        probe: ``"energy"`` (default), ``"max"``, ``"logit"`` (needs ``labels``), a callable
            ``(activation, labels) -> (B,)``, or a list with one of those per layer.
        labels: (B,) class labels for ``"logit"``; handed to callable probes (None otherwise).
        create_graph: build a graph so the maps are differentiable with respect to the model's
            parameters (a training loss).  False returns maps without a graph.
        strategy: ``"auto"`` (= ``"batched_backward"``), ``"batched_backward"``, ``"vmap"`` or
            ``"loop"``; all compute the same numbers (module docstring).
        chunk_size: samples per chunk for ``"vmap"`` and ``"batched_backward"`` (bounds memory);
            None processes the whole batch at once.  Ignored by ``"loop"``.
        p, channel_dim: attention-map power and channel dimension of the built-in probes (one
            channel dimension, or a list with one per layer).
        wrt: the entry of a dict x to differentiate.
        mask: (B, N) valid locations of a layer's activation (e.g. an ``attention_mask`` for
            token activations): the built-in ``"energy"`` / ``"max"`` probes ignore the masked
            locations; one mask for every layer or a list with one (or None) per layer.  Callable
            probes do not see it.

    Returns:
        A list of K tensors of shape (B, *x.shape[1:]) and x's dtype, one per layer, in order.

    Raises:
        UnknownLayerError: a name is not a module of ``model`` (the message lists the names).
        NotDifferentiableError: x is not floating point, inference mode is on, or torch cannot
            differentiate an op of the model as often as needed (the message names the modules).
        ValueError: a probe returned something other than one value per sample, bad options.
    """
    return _compute("input_jacobians", model, x, layers, v=None, probe=probe, labels=labels,
                    create_graph=create_graph, strategy=strategy, chunk_size=chunk_size, p=p,
                    channel_dim=channel_dim, wrt=wrt, mask=mask)


def _draw_v(op: str, v, generator, xt: torch.Tensor) -> torch.Tensor:
    if v is not None:
        return _check_v(op, v, xt)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
    return rademacher(xt.shape, generator=generator, dtype=xt.dtype, device=xt.device)


def input_hvps(
    model: nn.Module,
    x: Inputs,
    layers: Layers,
    *,
    v: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    probe: ProbeArg = "energy",
    labels: Optional[torch.Tensor] = None,
    create_graph: bool = False,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    p: float = 2.0,
    channel_dim: ChannelDims = 1,
    wrt: Optional[str] = None,
    mask=None,
) -> List[torch.Tensor]:
    """Per-sample Hessian-vector maps ``H_j[b] = d/dx_b < grad_{x_b} phi_j(x)_b, v_b >``.

    ``v`` (the shape of x) is used as given; when it is None a Rademacher tensor is drawn with
    :func:`rademacher` from ``generator`` (the default generator when None), so the same generator
    state gives the same v for a student and a teacher.  Every other argument is as in
    :func:`input_jacobians`.  Returns K tensors of shape (B, *x.shape[1:]).
    """
    op = "input_hvps"
    xt = _split_input(op, x, wrt)[0]
    return _compute(op, model, x, layers, v=_draw_v(op, v, generator, xt), probe=probe, labels=labels,
                    create_graph=create_graph, strategy=strategy, chunk_size=chunk_size, p=p,
                    channel_dim=channel_dim, wrt=wrt, mask=mask)


def _same_input(op: str, x, teacher_x) -> None:
    if teacher_x is None or teacher_x is x:
        return
    xs = dict(x) if isinstance(x, Mapping) else {"x": x}
    ts = dict(teacher_x) if isinstance(teacher_x, Mapping) else {"x": teacher_x}
    if not isinstance(teacher_x, (torch.Tensor, Mapping)):
        raise TypeError(f"{op}: teacher_x must be a torch.Tensor, a dict or None, got {type(teacher_x).__name__}")
    for key in dict.fromkeys([*xs, *ts]):
        a, b = xs.get(key), ts.get(key)
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            if a is b:
                continue
            raise ValueError(f"{op}: student and teacher must be fed the same x; entry {key!r} differs")
        same = a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a.detach(), b.detach())
        if not same:
            what = "x" if key == "x" and not isinstance(x, Mapping) else f"x[{key!r}]"
            raise ValueError(
                f"{op}: student and teacher must be fed the same x (derivative maps are compared sample by "
                f"sample as derivatives with respect to one input); got {what} of shape {_shape(a)} {a.dtype} on "
                f"{a.device} and teacher's of shape {_shape(b)} {b.dtype} on {b.device}"
                + ("" if b.shape != a.shape or b.dtype != a.dtype or b.device != a.device else " with different values")
            )


def derivative_maps(
    student: nn.Module,
    teacher: nn.Module,
    x: Union[Inputs, Tuple[Inputs, Inputs]],
    student_layers: Layers,
    teacher_layers: Layers,
    *,
    kind: str = "jacobian",
    teacher_x: Optional[Inputs] = None,
    v: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    probe: ProbeArg = "energy",
    labels: Optional[torch.Tensor] = None,
    create_graph: bool = False,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    p: float = 2.0,
    channel_dim: ChannelDims = 1,
    teacher_channel_dim: Optional[ChannelDims] = None,
    wrt: Optional[str] = None,
    mask=None,
    teacher_mask=None,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Student and teacher derivative maps of K matched layer pairs on one x: ``(student_maps,
    teacher_maps)``, each a list of K tensors of shape (B, *x.shape[1:]).

    ``kind`` is ``"jacobian"`` or ``"hvp"``.  For HVPs one v is used for both models: ``v`` as
    given, else one Rademacher draw from ``generator``.  Teacher maps never build a graph; student
    maps build one only with ``create_graph=True``.  ``x`` may be one tensor (or dict input), or a
    pair ``(student_x, teacher_x)`` / the ``teacher_x`` argument, which must then equal x (else
    ValueError: derivative maps of different inputs are not comparable).  ``teacher_channel_dim``
    defaults to ``channel_dim`` and ``teacher_mask`` to ``mask``.  Other arguments as in
    :func:`input_jacobians`.
    """
    op = "derivative_maps"
    if isinstance(x, (tuple, list)):
        if len(x) != 2 or teacher_x is not None:
            raise ValueError(f"{op}: x must be a tensor or a (student_x, teacher_x) pair (and then no teacher_x)")
        x, teacher_x = x
    _check_model(op, "student", student)
    _check_model(op, "teacher", teacher)
    xt = _split_input(op, x, wrt)[0]
    _same_input(op, x, teacher_x)
    if kind not in ("jacobian", "hvp"):
        raise ValueError(f"{op}: unknown kind {kind!r}; expected 'jacobian' or 'hvp'")
    s_taps = _layer_names(op, student_layers, "student_layers")
    t_taps = _layer_names(op, teacher_layers, "teacher_layers")
    if len(s_taps) != len(t_taps):
        raise ValueError(f"{op}: got {len(s_taps)} student_layers but {len(t_taps)} teacher_layers; "
                         "pass one teacher layer per student layer")
    # resolve both up front so a bad teacher name fails before any student work
    _resolve_layers(op, student, [n for n, _ in s_taps], "student_layers")
    _resolve_layers(op, teacher, [n for n, _ in t_taps], "teacher_layers")
    t_cd = channel_dim if teacher_channel_dim is None else teacher_channel_dim
    if kind == "hvp":
        v = _draw_v(op, v, generator, xt)
    common = dict(v=v, probe=probe, labels=labels, strategy=strategy, chunk_size=chunk_size, p=p, wrt=wrt)
    s_maps = _compute(op, student, x, s_taps, create_graph=create_graph, channel_dim=channel_dim,
                      layers_arg="student_layers", mask=mask, **common)
    t_maps = _compute(op, teacher, x, t_taps, create_graph=False, channel_dim=t_cd,
                      layers_arg="teacher_layers", mask=mask if teacher_mask is None else teacher_mask, **common)
    return s_maps, t_maps


# ------------------------------------------------------------------------------------------------
# Sketched derivative maps of token inputs (language models)
# ------------------------------------------------------------------------------------------------


def _input_embedding(op: str, who: str, model: nn.Module, name: Optional[str]) -> nn.Embedding:
    if name is not None:
        emb = _resolve_layers(op, model, [name], f"{who}_embedding")[name]
    else:
        get = getattr(model, "get_input_embeddings", None)
        emb = get() if callable(get) else None
        if emb is None:
            raise ValueError(f"{op}: {type(model).__name__} has no get_input_embeddings(); pass "
                             f"{who}_embedding=<the name of its token-embedding module>")
    if not isinstance(emb, nn.Embedding):
        raise TypeError(f"{op}: the {who}'s input embedding is {type(emb).__name__}; expected an nn.Embedding")
    return emb


def count_sketch(vocab: int, rank: int, *, generator: Optional[torch.Generator] = None,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """A CountSketch of the one-hot token space: ``(bucket, sign)``, each (V,), with
    ``R[t, bucket[t]] = sign[t]`` (every other entry 0) the (V, rank) projection.  ``R R^T`` equals
    the identity in expectation, so inner products and norms of projected maps are unbiased
    estimates of those of the maps themselves.  Drawn from ``generator`` (same state, same R)."""
    gen_device = generator.device if generator is not None else torch.device(device or "cpu")
    bucket = torch.randint(0, rank, (vocab,), generator=generator, device=gen_device)
    sign = rademacher((vocab,), generator=generator, device=gen_device)
    return bucket.to(device or gen_device), sign.to(device or gen_device)


def _sketched_embedding(weight: torch.Tensor, bucket: torch.Tensor, sign: torch.Tensor, rank: int) -> torch.Tensor:
    """``P = E^T R`` as a (D, rank) tensor, in O(V D) without forming R (differentiable in E)."""
    src = weight * sign.to(weight.dtype).unsqueeze(1)
    return weight.new_zeros(rank, weight.shape[1]).index_add(0, bucket.to(weight.device), src).t()


def sketched_derivative_maps(
    student: nn.Module,
    teacher: nn.Module,
    inputs: Mapping,
    student_layers: Layers,
    teacher_layers: Layers,
    *,
    kind: str = "jacobian",
    rank: int = 256,
    generator: Optional[torch.Generator] = None,
    probe: ProbeArg = "energy",
    labels: Optional[torch.Tensor] = None,
    create_graph: bool = False,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    p: float = 2.0,
    channel_dim: ChannelDims = -1,
    teacher_channel_dim: Optional[ChannelDims] = None,
    mask=None,
    teacher_mask=None,
    ids_key: str = "input_ids",
    embeds_key: str = "inputs_embeds",
    student_embedding: Optional[str] = None,
    teacher_embedding: Optional[str] = None,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Derivative maps of two language models with respect to their token input, sketched:
    ``(student_maps, teacher_maps)``, K tensors of shape (B, T, rank) each (SPEC section 3).

    Teacher and student share no float input (their embedding widths differ); the shared space is
    the one-hot tokens (B, T, V), where one map costs B*T*V numbers (2 GiB at B*T = 4096 and a
    128k vocabulary in float32).  The sketch projects the one-hot Jacobian ``J E^T`` (J with
    respect to the token embeddings, E the (V, D) embedding matrix) on a random (V, rank)
    CountSketch R shared by both models (:func:`count_sketch`, drawn from ``generator``), computed
    as ``J (E^T R)`` without forming the one-hot input or R: per map B*T*rank numbers, plus one
    (D, rank) matrix per model.  For ``kind="hvp"`` the direction is ``v = z R^T`` in the one-hot
    space, z a shared (B, T, rank) Rademacher draw: the sketch of ``H v`` is ``H_E (z P^T) P``
    with ``P = E^T R``.  Inner products of sketched maps estimate those of the exact one-hot maps
    without bias; ``python -m lwkd_fast.zoo --sketch`` measures the accuracy and the memory.

    ``inputs`` holds the token ids (``ids_key``, (B, T) integers) and the other keyword arguments
    of both models (e.g. ``attention_mask``); the models are called with ``embeds_key`` (the
    Hugging Face ``inputs_embeds``) instead of the ids.  The embeddings come from
    ``get_input_embeddings()`` or the named modules; both vocabularies must have the same size.
    The maps are differentiable with respect to the student (through its forward and its
    embedding matrix) with ``create_graph=True``.  Other arguments as in :func:`derivative_maps`;
    ``mask`` / ``teacher_mask`` are the probes' (B, N) valid locations (e.g. the attention mask).
    """
    op = "sketched_derivative_maps"
    _check_model(op, "student", student)
    _check_model(op, "teacher", teacher)
    if not isinstance(inputs, Mapping) or ids_key not in inputs:
        raise ValueError(f"{op}: inputs must be a dict with the token ids under {ids_key!r}")
    ids = inputs[ids_key]
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(f"{op}: inputs[{ids_key!r}] must be a (B, T) integer tensor of token ids, got "
                         f"{type(ids).__name__ if not isinstance(ids, torch.Tensor) else (ids.dtype, _shape(ids))}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{op}: rank must be a positive int, got {rank!r}")
    if kind not in ("jacobian", "hvp"):
        raise ValueError(f"{op}: unknown kind {kind!r}; expected 'jacobian' or 'hvp'")
    e_s = _input_embedding(op, "student", student, student_embedding)
    e_t = _input_embedding(op, "teacher", teacher, teacher_embedding)
    if e_s.num_embeddings != e_t.num_embeddings:
        raise ValueError(f"{op}: the vocabularies differ (student {e_s.num_embeddings} tokens, teacher "
                         f"{e_t.num_embeddings}); sketched maps compare derivatives with respect to shared tokens")
    bucket, sign = count_sketch(e_s.num_embeddings, rank, generator=generator, device=ids.device)
    z = None
    if kind == "hvp":
        z = rademacher((*ids.shape, rank), generator=generator, dtype=e_s.weight.dtype, device=ids.device)
    rest = {k: t for k, t in inputs.items() if k != ids_key}
    t_cd = channel_dim if teacher_channel_dim is None else teacher_channel_dim
    common = dict(probe=probe, labels=labels, strategy=strategy, chunk_size=chunk_size, p=p, wrt=embeds_key)
    out = []
    for who, model, emb, layers, cd, m, graph in (
            ("student", student, e_s, student_layers, channel_dim, mask, bool(create_graph)),
            ("teacher", teacher, e_t, teacher_layers, t_cd, mask if teacher_mask is None else teacher_mask, False)):
        with torch.set_grad_enabled(graph):
            P = _sketched_embedding(emb.weight, bucket, sign, rank)  # (D, rank)
            embeds = F.embedding(ids, emb.weight)
        if not graph:
            P, embeds = P.detach(), embeds.detach()
        v = None if z is None else (z.to(P.dtype) @ P.t())  # z R^T E, in embedding space
        maps = _compute(op, model, {**rest, embeds_key: embeds}, layers, v=v, create_graph=graph,
                        channel_dim=cd, layers_arg=f"{who}_layers", mask=m, **common)
        with torch.set_grad_enabled(graph):
            out.append([mp @ P.to(mp.dtype) for mp in maps])
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------
# Making a model twice differentiable
# ------------------------------------------------------------------------------------------------


class Relu6Hardsigmoid(nn.Module):
    """``relu6(x + 3) / 6``: the function of ``nn.Hardsigmoid`` in a form torch differentiates
    twice (``aten::hardsigmoid_backward`` has no derivative)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


def replace_hardsigmoid(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Hardsigmoid`` sub-module of ``model`` (in place) by
    :class:`Relu6Hardsigmoid`, the same function with a second derivative, so Hessian-vector
    maps and Jacobian losses work on e.g. torchvision's MobileNetV3.  Returns the model."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.Hardsigmoid):
                setattr(m, child_name, Relu6Hardsigmoid())
    return model
