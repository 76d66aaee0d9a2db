"""Per-layer input Jacobians and Hessian-vector products of a model (SPEC section 3).

For K named layers j of a model and a batch x of B samples this module computes, for every
sample b, the derivative of a scalar *probe* ``phi_j(x)_b`` of layer j's activation with respect
to that sample's input ``x_b``:

* Jacobian map  ``J_j[b] = d phi_j(x)_b / d x_b``                         (:func:`input_jacobians`)
* HVP map       ``H_j[b] = d/dx_b < grad_{x_b} phi_j(x)_b , v_b >``         (:func:`input_hvps`)

Each map has the shape of x, ``(B, *x.shape[1:])``.  :func:`derivative_maps` computes the maps of
a student and a teacher together on one x (and, for HVPs, one Rademacher v).

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
* dropout layers (``nn.Dropout*``, ``nn.AlphaDropout``, attention dropout of
  ``nn.MultiheadAttention``) are off; train-mode InstanceNorm does not update running statistics.
* after the session every patched forward, hook and training flag is restored, and any buffer
  that a module nevertheless changed in place is copied back: computing maps leaves the model's
  state (running statistics, ``num_batches_tracked``) exactly as it was.

The session patches module attributes, so one model must not be used by two threads at once
while its maps are computed.  A layer that runs more than once in a forward contributes its last
output.

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
import copy
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference

__all__ = [
    "PROBES",
    "STRATEGIES",
    "NotDifferentiableError",
    "UnknownLayerError",
    "derivative_maps",
    "input_hvps",
    "input_jacobians",
    "rademacher",
]

STRATEGIES = ("auto", "batched_backward", "vmap", "loop")
PROBES = ("energy", "max", "logit")

ProbeFn = Callable[[object, Optional[torch.Tensor]], torch.Tensor]
ProbeArg = Union[str, ProbeFn, Sequence[Union[str, ProbeFn]]]
Layers = Union[str, Sequence[str]]


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


def _layer_names(op: str, layers: Layers, arg: str = "layers") -> List[str]:
    if isinstance(layers, str):
        return [layers]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(f"{op}: {arg} must be a module name or a list of module names, got {type(layers).__name__}")
    for n in layers:
        if not isinstance(n, str):
            raise TypeError(f"{op}: {arg} must contain module names (str), got {type(n).__name__} {n!r}")
    return list(layers)


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
# Probes
# ------------------------------------------------------------------------------------------------


def _first_tensor(op: str, layer: str, act, probe: str) -> torch.Tensor:
    if isinstance(act, (tuple, list)) and act and isinstance(act[0], torch.Tensor):
        act = act[0]  # e.g. nn.MultiheadAttention returns (output, weights)
    if not isinstance(act, torch.Tensor):
        raise TypeError(
            f"{op}: layer {layer!r} returned {type(act).__name__}; probe {probe!r} needs a tensor "
            "activation (pass a callable probe to handle other outputs)"
        )
    if not act.is_floating_point():
        raise TypeError(f"{op}: layer {layer!r} returned dtype {act.dtype}; probe {probe!r} needs a floating tensor")
    return act


def _attention_mass(op: str, layer: str, act, probe: str, p: float, channel_dim: int) -> torch.Tensor:
    a = _first_tensor(op, layer, act, probe)
    if a.dim() >= 2 and (not -a.dim() <= channel_dim < a.dim() or channel_dim % a.dim() == 0):
        raise ValueError(
            f"{op}: channel_dim={channel_dim} is not a channel dimension of layer {layer!r}'s activation "
            f"(shape {_shape(a)}); use channel_dim=1 for (B, C, *S) and channel_dim=-1 for (B, N, D)"
        )
    return reference.attention_maps(a, p=p, channel_dim=channel_dim)


def _make_probe(op: str, probe, p: float, channel_dim: int) -> Tuple[str, Callable]:
    """(display name, fn(layer, activation, labels) -> (n,)) of one probe."""
    if callable(probe) and not isinstance(probe, str):
        name = getattr(probe, "__name__", type(probe).__name__)
        return f"callable {name}", lambda layer, act, labels: probe(act, labels)
    if probe == "energy":
        return "energy", lambda layer, act, labels: _attention_mass(op, layer, act, "energy", p, channel_dim).sum(1)
    if probe == "max":
        return "max", lambda layer, act, labels: _attention_mass(op, layer, act, "max", p, channel_dim).amax(1)
    if probe == "logit":
        def logit(layer, act, labels):
            a = _first_tensor(op, layer, act, "logit")
            if a.dim() != 2:
                raise ValueError(
                    f"{op}: probe 'logit' needs a (B, num_classes) activation, but layer {layer!r} returned "
                    f"shape {_shape(a)}; use it on the output layer (e.g. the classifier, or '' for the model)"
                )
            return a.gather(1, labels.reshape(-1, 1)).squeeze(1)

        return "logit", logit
    raise ValueError(f"{op}: unknown probe {probe!r}; expected one of {', '.join(map(repr, PROBES))} or a callable "
                     "(activation, labels) -> (B,)")


def _make_probes(op: str, probe: ProbeArg, K: int, p: float, channel_dim: int):
    if isinstance(probe, (list, tuple)):
        if len(probe) != K:
            raise ValueError(f"{op}: got {len(probe)} probes for {K} layers; pass one probe or one per layer")
        probes = list(probe)
    else:
        probes = [probe] * K
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
        raise ValueError(f"{op}: p must be a positive number, got {p!r}")
    if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
        raise TypeError(f"{op}: channel_dim must be an int, got {type(channel_dim).__name__}")
    made = [_make_probe(op, pr, float(p), channel_dim) for pr in probes]
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
    """The module's own input-rank check (BatchNorm2d wants 4-D input, ...), when it has one."""
    try:
        m._check_input_dim(inp)
    except (AttributeError, NotImplementedError):  # a custom subclass without the check
        pass


class _Session:
    """Context manager that puts ``model`` in the per-sample state described in the module
    docstring and captures the activations of ``names``.

    ``mode`` is ``"record"`` (batch-statistics BatchNorm layers compute the statistics of their
    input and store them) or ``"replay"`` (they reuse the statistics recorded in call order).
    """

    def __init__(self, op: str, model: nn.Module, names: List[str], modules: Dict[str, nn.Module]):
        self.op = op
        self.model = model
        self.names = names
        self.modules = modules
        self.acts: Dict[str, object] = {}
        self.mode = "record"
        self.bn = [m for m in model.modules() if _uses_batch_stats(m)]
        self.recorded: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {id(m): [] for m in self.bn}
        self.cursor: Dict[int, int] = {}
        self._undo: List[Callable[[], None]] = []

    @property
    def needs_stats(self) -> bool:
        return bool(self.bn)

    # -- patched forwards -------------------------------------------------------------------------

    def _bn_forward(self, m: nn.modules.batchnorm._BatchNorm):
        key = id(m)

        def forward(inp: torch.Tensor) -> torch.Tensor:
            _check_input_dim(m, inp)
            if self.mode == "record":
                mean, var = _batch_stats(inp)
                like = m.running_mean if m.running_mean is not None else m.weight
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
            return F.batch_norm(inp, mean, var, m.weight, m.bias, False, 0.0, m.eps)

        return forward

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
        def hook(_mod, _inp, out):
            # a copy: later in-place ops of the model (ReLU(inplace=True)) must not touch it
            if isinstance(out, torch.Tensor):
                out = out.clone()
            elif type(out) in (tuple, list):
                out = type(out)(o.clone() if isinstance(o, torch.Tensor) else o for o in out)
            self.acts[name] = out

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
                    self._patch_forward(m, self._bn_forward(m))
                elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.training and m.track_running_stats:
                    self._patch_forward(m, self._in_forward(m))
                elif isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention)) and m.training:
                    m.training = False
                    self._undo.append(lambda m=m: setattr(m, "training", True))
            for name in dict.fromkeys(self.names):
                h = self.modules[name].register_forward_hook(self._hook(name))
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

    def record_stats(self, x: torch.Tensor) -> None:
        """Run the whole batch once without a graph to record the batch statistics, then switch to
        replaying them (used by the per-sample strategies)."""
        self.mode = "record"
        for lst in self.recorded.values():
            lst.clear()
        if self.needs_stats:
            with torch.no_grad():
                self.model(x)
        self.acts.clear()
        self.mode = "replay"

    def probes(self, x: torch.Tensor, labels: Optional[torch.Tensor], probe_fns) -> List[torch.Tensor]:
        """Forward ``x`` (n samples) and return each layer's probe, a (n,) tensor."""
        self.acts.clear()
        self.cursor.clear()
        if self.mode == "record":
            for lst in self.recorded.values():
                lst.clear()
        self.model(x)
        n = x.shape[0]
        out = []
        for name, (pname, fn) in zip(self.names, probe_fns):
            if name not in self.acts:
                raise RuntimeError(f"{self.op}: layer {name!r} did not run in the forward pass of "
                                   f"{type(self.model).__name__}")
            act = self.acts[name]
            phi = fn(name, act, labels)
            if not isinstance(phi, torch.Tensor) or _shape(phi) != (n,) or not phi.is_floating_point():
                got = f"shape {_shape(phi)} dtype {phi.dtype}" if isinstance(phi, torch.Tensor) else type(phi).__name__
                act_s = f"shape {_shape(act)}" if isinstance(act, torch.Tensor) else type(act).__name__
                raise ValueError(
                    f"{self.op}: probe {pname} returned {got} for layer {name!r} (activation {act_s}); "
                    f"a probe must return one floating value per sample, shape ({n},)"
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


def _run_batched(sess: _Session, x, labels, v, probe_fns, create_graph, keep_graph, chunk):
    B = x.shape[0]
    if chunk is None or chunk >= B:
        sess.mode = "record"
        with torch.enable_grad():
            xin = _leaf(x, keep_graph)
            phis = sess.probes(xin, labels, probe_fns)
            return _maps_from_probes(phis, xin, v, create_graph)
    sess.record_stats(x)
    parts: List[List[torch.Tensor]] = []
    with torch.enable_grad():
        for s in range(0, B, chunk):
            xin = _leaf(x[s:s + chunk], keep_graph)
            phis = sess.probes(xin, None if labels is None else labels[s:s + chunk], probe_fns)
            parts.append(_maps_from_probes(phis, xin, None if v is None else v[s:s + chunk], create_graph))
    return [torch.cat([p[j] for p in parts]) for j in range(len(probe_fns))]


def _run_loop(sess: _Session, x, labels, v, probe_fns, create_graph, keep_graph):
    sess.record_stats(x)
    rows: List[List[torch.Tensor]] = []
    with torch.enable_grad():
        for b in range(x.shape[0]):
            xb = _leaf(x[b:b + 1], keep_graph)
            phis = sess.probes(xb, None if labels is None else labels[b:b + 1], probe_fns)
            rows.append(_maps_from_probes(phis, xb, None if v is None else v[b:b + 1], create_graph))
    return [torch.cat([r[j] for r in rows]) for j in range(len(probe_fns))]


def _run_vmap(sess: _Session, x, labels, v, probe_fns, create_graph, chunk):
    from torch.func import grad, vjp, vmap

    sess.record_stats(x)
    K = len(probe_fns)

    def per_sample(xb, yb):
        phis = sess.probes(xb.unsqueeze(0), None if yb is None else yb.unsqueeze(0), probe_fns)
        return tuple(phi.reshape(()) for phi in phis)

    def jacobian_rows(xb, yb):
        # one forward, then one pullback per layer (a one-hot cotangent over the K probes)
        out, pull = vjp(lambda z: per_sample(z, yb), xb)
        rows = []
        for j in range(K):
            ct = tuple(torch.ones_like(o) if i == j else torch.zeros_like(o) for i, o in enumerate(out))
            rows.append(pull(ct)[0])
        return tuple(rows)

    def hvp_rows(xb, vb, yb):
        # reverse-over-reverse per layer: d/dz < grad phi_j(z), v >
        rows = []
        for j in range(K):
            def gv(z, j=j):
                return (grad(lambda w: per_sample(w, yb)[j])(z) * vb).sum()

            rows.append(grad(gv)(xb))
        return tuple(rows)

    y_dim = None if labels is None else 0
    if v is None:
        fn = vmap(jacobian_rows, in_dims=(0, y_dim), chunk_size=chunk, randomness="different")
        args = (x, labels)
    else:
        fn = vmap(hvp_rows, in_dims=(0, 0, y_dim), chunk_size=chunk, randomness="different")
        args = (x, v, labels)
    ctx = contextlib.nullcontext() if create_graph else torch.no_grad()
    with ctx:
        return list(fn(*args))  # K tensors (B, *sample shape)


def _compute(op: str, model: nn.Module, x: torch.Tensor, layers: Layers, *, v: Optional[torch.Tensor],
             probe, labels, create_graph: bool, strategy: str, chunk_size, p: float, channel_dim: int,
             layers_arg: str = "layers") -> List[torch.Tensor]:
    _check_model(op, "model", model)
    _check_input(op, x)
    strat = _check_strategy(op, strategy)
    chunk = _check_chunk(op, chunk_size)
    names = _layer_names(op, layers, layers_arg)
    modules = _resolve_layers(op, model, names, layers_arg)
    probe_fns, needs_labels = _make_probes(op, probe, len(names), p, channel_dim)
    labels = _check_labels(op, labels, x, needs_labels)
    if not names:
        return []
    create_graph = bool(create_graph)
    keep_graph = create_graph and x.requires_grad
    # vmap: the math kernel also has batching rules (the fused CPU kernel falls back to a loop)
    math_attention = v is not None or create_graph or strat == "vmap"
    with _Session(op, model, names, modules) as sess, _math_attention(math_attention):
        if strat == "batched_backward":
            maps = _run_batched(sess, x, labels, v, probe_fns, create_graph, keep_graph, chunk)
        elif strat == "vmap":
            maps = _run_vmap(sess, x, labels, v, probe_fns, create_graph, chunk)
        else:
            maps = _run_loop(sess, x, labels, v, probe_fns, create_graph, keep_graph)
    if not create_graph:
        maps = [m.detach() for m in maps]
    return maps


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def input_jacobians(
    model: nn.Module,
    x: torch.Tensor,
    layers: Layers,
    *,
    probe: ProbeArg = "energy",
    labels: Optional[torch.Tensor] = None,
    create_graph: bool = False,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    p: float = 2.0,
    channel_dim: int = 1,
) -> List[torch.Tensor]:
    """Per-sample input Jacobian maps ``J_j[b] = d phi_j(x)_b / d x_b`` of the named layers.

    Args:
        model: any ``nn.Module``, called as ``model(batch)``: once for ``batched_backward``; the
            per-sample strategies (and ``chunk_size``) first run the whole batch once without a
            graph when the model has batch-statistics BatchNorm layers (module docstring).
        x: the batch (B, ...), floating point.  Gradients are taken with respect to a detached copy
            of x unless ``create_graph=True`` and x requires grad (then the maps also depend on
            whatever x depends on).
        layers: module names as ``model.named_modules()`` gives them ("" is the model itself), or
            one name.
        probe: ``"energy"`` (default), ``"max"``, ``"logit"`` (needs ``labels``), a callable
            ``(activation, labels) -> (B,)``, or a list with one of those per layer.
        labels: (B,) class labels for ``"logit"``; handed to callable probes (None otherwise).
        create_graph: build a graph so the maps are differentiable with respect to the model's
            parameters (a training loss).  False returns maps without a graph.
        strategy: ``"auto"`` (= ``"batched_backward"``), ``"batched_backward"``, ``"vmap"`` or
            ``"loop"``; all compute the same numbers (module docstring).
        chunk_size: samples per chunk for ``"vmap"`` and ``"batched_backward"`` (bounds memory);
            None processes the whole batch at once.  Ignored by ``"loop"``.
        p, channel_dim: attention-map power and channel dimension of the built-in probes.

    Returns:
        A list of K tensors of shape (B, *x.shape[1:]) and x's dtype, one per layer, in order.

    Raises:
        UnknownLayerError: a name is not a module of ``model`` (the message lists the names).
        NotDifferentiableError: x is not floating point, or inference mode is on.
        ValueError: a probe returned something other than one value per sample, bad options.
    """
    return _compute("input_jacobians", model, x, layers, v=None, probe=probe, labels=labels,
                    create_graph=create_graph, strategy=strategy, chunk_size=chunk_size, p=p,
                    channel_dim=channel_dim)


def input_hvps(
    model: nn.Module,
    x: torch.Tensor,
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
    channel_dim: int = 1,
) -> List[torch.Tensor]:
    """Per-sample Hessian-vector maps ``H_j[b] = d/dx_b < grad_{x_b} phi_j(x)_b, v_b >``.

    ``v`` (the shape of x) is used as given; when it is None a Rademacher tensor is drawn with
    :func:`rademacher` from ``generator`` (the default generator when None), so the same generator
    state gives the same v for a student and a teacher.  Every other argument is as in
    :func:`input_jacobians`.  Returns K tensors of shape (B, *x.shape[1:]).
    """
    op = "input_hvps"
    _check_input(op, x)
    if v is None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{op}: generator must be a torch.Generator, got {type(generator).__name__}")
        v = rademacher(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        v = _check_v(op, v, x)
    return _compute(op, model, x, layers, v=v, probe=probe, labels=labels, create_graph=create_graph,
                    strategy=strategy, chunk_size=chunk_size, p=p, channel_dim=channel_dim)


def _same_input(op: str, x: torch.Tensor, teacher_x) -> None:
    if teacher_x is None or teacher_x is x:
        return
    if not isinstance(teacher_x, torch.Tensor):
        raise TypeError(f"{op}: teacher_x must be a torch.Tensor or None, got {type(teacher_x).__name__}")
    same = (
        teacher_x.shape == x.shape
        and teacher_x.dtype == x.dtype
        and teacher_x.device == x.device
        and torch.equal(teacher_x.detach(), x.detach())
    )
    if not same:
        raise ValueError(
            f"{op}: student and teacher must be fed the same x (derivative maps are compared sample by "
            f"sample as derivatives with respect to one input); got x of shape {_shape(x)} {x.dtype} on "
            f"{x.device} and teacher_x of shape {_shape(teacher_x)} {teacher_x.dtype} on {teacher_x.device}"
            + ("" if teacher_x.shape != x.shape or teacher_x.dtype != x.dtype or teacher_x.device != x.device
               else " with different values")
        )


def derivative_maps(
    student: nn.Module,
    teacher: nn.Module,
    x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
    student_layers: Layers,
    teacher_layers: Layers,
    *,
    kind: str = "jacobian",
    teacher_x: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    probe: ProbeArg = "energy",
    labels: Optional[torch.Tensor] = None,
    create_graph: bool = False,
    strategy: str = "auto",
    chunk_size: Optional[int] = None,
    p: float = 2.0,
    channel_dim: int = 1,
    teacher_channel_dim: Optional[int] = None,
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Student and teacher derivative maps of K matched layer pairs on one x: ``(student_maps,
    teacher_maps)``, each a list of K tensors of shape (B, *x.shape[1:]).

    ``kind`` is ``"jacobian"`` or ``"hvp"``.  For HVPs one v is used for both models: ``v`` as
    given, else one Rademacher draw from ``generator``.  Teacher maps never build a graph; student
    maps build one only with ``create_graph=True``.  ``x`` may be one tensor, or a pair
    ``(student_x, teacher_x)`` / the ``teacher_x`` argument, which must then equal x (else
    ValueError: derivative maps of different inputs are not comparable).  ``teacher_channel_dim``
    defaults to ``channel_dim``.  Other arguments as in :func:`input_jacobians`.
    """
    op = "derivative_maps"
    if isinstance(x, (tuple, list)):
        if len(x) != 2 or teacher_x is not None:
            raise ValueError(f"{op}: x must be a tensor or a (student_x, teacher_x) pair (and then no teacher_x)")
        x, teacher_x = x
    _check_model(op, "student", student)
    _check_model(op, "teacher", teacher)
    _check_input(op, x)
    _same_input(op, x, teacher_x)
    if kind not in ("jacobian", "hvp"):
        raise ValueError(f"{op}: unknown kind {kind!r}; expected 'jacobian' or 'hvp'")
    s_names = _layer_names(op, student_layers, "student_layers")
    t_names = _layer_names(op, teacher_layers, "teacher_layers")
    if len(s_names) != len(t_names):
        raise ValueError(f"{op}: got {len(s_names)} student_layers but {len(t_names)} teacher_layers; "
                         "pass one teacher layer per student layer")
    # resolve both up front so a bad teacher name fails before any student work
    _resolve_layers(op, student, s_names, "student_layers")
    _resolve_layers(op, teacher, t_names, "teacher_layers")
    t_cd = channel_dim if teacher_channel_dim is None else teacher_channel_dim
    if kind == "hvp":
        if v is None:
            v = rademacher(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        else:
            v = _check_v(op, v, x)
    common = dict(v=v, probe=probe, labels=labels, strategy=strategy, chunk_size=chunk_size, p=p)
    s_maps = _compute(op, student, x, s_names, create_graph=create_graph, channel_dim=channel_dim,
                      layers_arg="student_layers", **common)
    t_maps = _compute(op, teacher, x, t_names, create_graph=False, channel_dim=t_cd,
                      layers_arg="teacher_layers", **common)
    return s_maps, t_maps


# ------------------------------------------------------------------------------------------------
# `lwkd-fast check` cases
# ------------------------------------------------------------------------------------------------


class _CheckCNN(nn.Module):
    """Tiny CNN with train-mode BatchNorm, a residual add and a head (the check's model)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.bn1(self.conv1(x)))
        h = torch.tanh(self.bn2(self.conv2(h)) + h)
        return self.head(h.mean((2, 3)))


def _check_setup(device: torch.device):
    g = torch.Generator().manual_seed(3)
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(5)
        model = _CheckCNN()
    finally:
        torch.random.set_rng_state(torch_state)
    x = torch.randn(3, 2, 5, 4, generator=g)
    v = rademacher(x.shape, generator=g, dtype=torch.float64)
    return model.to(device).train(), x.to(device), v.to(device)


CHECK_LAYERS = ("bn1", "conv2", "head")


def lwkd_checks(backend: str, device: torch.device) -> Iterable:
    """Cases for ``lwkd-fast check``: every strategy against the ``loop`` oracle in float64, in
    float64 and float32, on a train-mode BatchNorm CNN.  The strategies are not backends, so only
    the ``reference`` pass yields cases."""
    if backend != "reference":
        return
    from .check import Case
    from .testing import compare

    for kind in ("jacobian", "hvp"):
        for strategy in ("batched_backward", "vmap"):
            for dtype in (torch.float64, torch.float32):
                def run(kind=kind, strategy=strategy, dtype=dtype):
                    model, x, v = _check_setup(device)
                    probes = ["energy", "max", "logit"]
                    labels = torch.tensor([0, 2, 1], device=device)
                    m64 = copy.deepcopy(model).double()
                    fn = input_jacobians if kind == "jacobian" else input_hvps
                    extra = {} if kind == "jacobian" else {"v": v}
                    ref = fn(m64, x.double(), list(CHECK_LAYERS), probe=probes, labels=labels,
                             strategy="loop", **extra)
                    m = model.to(dtype)
                    extra = {} if kind == "jacobian" else {"v": v.to(dtype)}
                    got = fn(m, x.to(dtype), list(CHECK_LAYERS), probe=probes, labels=labels,
                             strategy=strategy, **extra)
                    return {f"{name}": compare(a, r, dtype) for name, a, r in zip(CHECK_LAYERS, got, ref)}

                yield Case("derivatives", f"{kind} {strategy} vs loop (train-mode BN CNN)", dtype, run)
