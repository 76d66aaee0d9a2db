"""Hugging Face ``transformers`` models in the layer-wise distiller: hidden-state and attention
pairings.

``LayerwiseDistiller`` takes Hugging Face models as they come (dict batches with ``input_ids`` /
``attention_mask``, ``ModelOutput`` results, causal-LM targets; derivative maps sketched over the
shared vocabulary).  This module names the layers to pair from the model's own structure, the
way HF distillation recipes do (TinyBERT, MiniLM, DistilBERT):

* :func:`hidden_state_pairs` -- the outputs of the transformer layers, i.e. the model's
  ``hidden_states[1:]``, student layer i paired with teacher layer round((i+1) L_t / L_s) - 1;
* :func:`attention_pairs` -- the self-attention probabilities (B, heads, T, T) of the same layers
  (output 1 of the attention module; needs ``attn_implementation="eager"``, the only attention
  implementation that materialises them), heads being the channels of the attention map and the
  query x key positions its locations.

Example::

    from lwkd_fast.integrations.transformers import attention_pairs
    d = lw.LayerwiseDistiller(student, teacher, pairs=attention_pairs(student, teacher),
                              example_input=batch)          # batch = tokenizer(..., return_tensors="pt")
    out = d(batch, labels)                                   # padded tokens do not count

Post-LayerNorm models (BERT) have flat hidden states at random initialisation (every token's
energy is 1): the distiller warns about such pairs; ``pairs="auto"`` pairs each layer's last
non-flat sub-module instead.  The module imports nothing from ``transformers`` itself: it reads the
models' ``config`` and module tree.
"""

from __future__ import annotations

from typing import List, Tuple

import torch.nn as nn

from ..distill import depth_map

__all__ = ["attention_pairs", "attention_module", "hidden_state_pairs", "layer_stack"]


def _config(op: str, model: nn.Module):
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_hidden_layers"):
        raise TypeError(f"{op}: {type(model).__name__} is not a Hugging Face transformers model (no config with "
                        "num_hidden_layers)")
    return cfg


def layer_stack(model: nn.Module, op: str = "layer_stack") -> List[str]:
    """Names of the model's transformer layers, in order: the ``nn.ModuleList`` of
    ``config.num_hidden_layers`` modules of one class (``bert.encoder.layer``, ``transformer.h``,
    ``model.layers``, ...)."""
    n = _config(op, model).num_hidden_layers
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n and n > 0 and len({type(c) for c in m}) == 1:
            return [f"{name}.{i}" for i in range(n)]
    raise ValueError(f"{op}: found no ModuleList of {n} layers (config.num_hidden_layers) in {type(model).__name__}")


def attention_module(model: nn.Module, layer: str, op: str = "attention_module") -> str:
    """The self-attention module of one transformer layer: the first sub-module whose class name
    ends in ``SelfAttention``, else in ``Attention`` (HF attention modules return
    ``(output, attention probabilities)``)."""
    prefix = layer + "."
    subs = [(n, m) for n, m in model.named_modules() if n.startswith(prefix)]
    for suffix in ("SelfAttention", "Attention"):
        for n, m in subs:
            if type(m).__name__.endswith(suffix):
                return n
    raise ValueError(f"{op}: layer {layer!r} of {type(model).__name__} has no module whose class name ends in "
                     "'SelfAttention' or 'Attention'")


def _mapped(op: str, student: nn.Module, teacher: nn.Module) -> List[Tuple[str, str]]:
    s, t = layer_stack(student, op), layer_stack(teacher, op)
    return [(s[i], t[j]) for i, j in depth_map(len(s), len(t))]


def hidden_state_pairs(student: nn.Module, teacher: nn.Module) -> List[Tuple[str, str]]:
    """``[(student layer, teacher layer), ...]``: the layer outputs (``hidden_states[i + 1]``),
    min(L_s, L_t) pairs, the shallower model's layer i with the deeper one's layer
    round((i+1) L_deep / L_shallow) - 1."""
    return _mapped("hidden_state_pairs", student, teacher)


def attention_pairs(student: nn.Module, teacher: nn.Module) -> List[Tuple[Tuple[str, int], Tuple[str, int]]]:
    """``[((student attention, 1), (teacher attention, 1)), ...]``: the self-attention probabilities
    (B, heads, T, T) of the layers :func:`hidden_state_pairs` pairs, as ``(module, output index)``
    sides of ``LayerwiseDistiller(pairs=...)``.  Both models must use eager attention
    (``attn_implementation="eager"``): sdpa and flash attention return no probabilities."""
    op = "attention_pairs"
    for who, model in (("student", student), ("teacher", teacher)):
        impl = getattr(_config(op, model), "_attn_implementation", None)
        if impl != "eager":
            raise ValueError(f"{op}: the {who} uses attn_implementation={impl!r}, which does not return attention "
                             "probabilities; build or load it with attn_implementation='eager'")
    return [((attention_module(student, s, op), 1), (attention_module(teacher, t, op), 1))
            for s, t in _mapped(op, student, teacher)]
