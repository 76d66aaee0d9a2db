"""Tiny random-init student/teacher pairs of real architectures (torchvision, timm, Hugging Face
transformers), built from configs: nothing is downloaded.

They are what the model tests, the README's "Distilling your model" section and
``python -m lwkd_fast.zoo`` (the per-family report of the pairs ``pairs="auto"`` chooses and
whether every method trains) run on.  Each family needs its package (``pip install
"lwkd-fast[dev]"``); :func:`build` imports it only when that family is built.

``build(family)`` returns a :class:`ZooCase`: ``student``, ``teacher`` (eval mode), an input
batch ``x`` (a tensor, or a dict of tensors for the language models) and targets ``y``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Tuple

import torch
import torch.nn as nn

__all__ = ["FAMILIES", "ZooCase", "build"]


@dataclass
class ZooCase:
    family: str
    student: nn.Module
    teacher: nn.Module
    x: Any
    y: torch.Tensor
    note: str


def _images(batch: int, size: int, classes: int = 10, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)


def _tokens(batch: int, length: int, vocab: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Token ids and an attention mask whose last sample is right-padded (3 pad tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - 3:] = 0
    ids[-1, length - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _tv_resnet():
    from torchvision.models import resnet18, resnet50

    x, y = _images(2, 32)
    return resnet18(num_classes=10), resnet50(num_classes=10), x, y, "torchvision resnet18 <- resnet50, 32x32"


def _tv_mobilenet():
    from torchvision.models import mobilenet_v3_small, resnet18

    x, y = _images(2, 32)
    return (mobilenet_v3_small(num_classes=10), resnet18(num_classes=10), x, y,
            "torchvision mobilenet_v3_small <- resnet18, 32x32")


def _timm_resnet():
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    x, y = _images(2, 32)
    s = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, channels=(16, 32, 64, 128), stem_width=16)
    t = ResNet(Bottleneck, [2, 2, 2, 2], num_classes=10, channels=(16, 32, 64, 128), stem_width=16)
    return s, t, x, y, "timm ResNet basic [1,1,1,1] <- bottleneck [2,2,2,2], 32x32"


def _timm_convnext():
    from timm.models.convnext import ConvNeXt

    x, y = _images(2, 32)
    s = ConvNeXt(depths=(1, 1, 1, 1), dims=(24, 32, 40, 48), num_classes=10, drop_path_rate=0.1)
    t = ConvNeXt(depths=(2, 2, 2, 2), dims=(32, 40, 56, 64), num_classes=10)
    return s, t, x, y, "timm ConvNeXt depths 1x4 <- 2x4, 32x32 (student drop_path 0.1)"


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    x, y = _images(2, 32)
    kw = dict(img_size=32, patch_size=8, num_classes=10, mlp_ratio=2.0)
    s = VisionTransformer(embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1, attn_drop_rate=0.1,
                          proj_drop_rate=0.1, **kw)
    t = VisionTransformer(embed_dim=48, depth=4, num_heads=3, **kw)
    return s, t, x, y, "timm ViT depth 2, width 32 <- depth 4, width 48, 32x32 / patch 8 (student dropouts 0.1)"


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    x, y = _images(2, 32)
    kw = dict(img_size=32, patch_size=4, window_size=2, num_classes=10, mlp_ratio=2.0)
    s = SwinTransformer(embed_dim=20, depths=(1, 1, 1), num_heads=(1, 2, 4), drop_path_rate=0.1, **kw)
    t = SwinTransformer(embed_dim=28, depths=(2, 2, 2), num_heads=(1, 2, 4), drop_path_rate=0.0, **kw)
    return s, t, x, y, "timm Swin depths (1,1,1), width 20 <- (2,2,2), width 28, 32x32 / patch 4"


def _hf_bert():
    from transformers import BertConfig, BertForSequenceClassification

    def cfg(width, layers, heads):
        return BertConfig(vocab_size=97, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=2 * width, max_position_embeddings=32, num_labels=3,
                          attn_implementation="eager")

    x = _tokens(2, 12, 97)
    y = torch.tensor([0, 2])
    s = BertForSequenceClassification(cfg(32, 2, 2))
    t = BertForSequenceClassification(cfg(48, 4, 3))
    return s, t, x, y, "HF BertForSequenceClassification 2 layers, width 32 <- 4 layers, width 48, 12 tokens"


def _hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    def cfg(width, layers, heads):
        return GPT2Config(vocab_size=97, n_embd=width, n_layer=layers, n_head=heads, n_positions=32,
                          attn_implementation="eager")

    x = _tokens(2, 12, 97)
    s = GPT2LMHeadModel(cfg(32, 2, 2))
    t = GPT2LMHeadModel(cfg(48, 4, 3))
    return s, t, x, x["input_ids"].clone(), "HF GPT2LMHeadModel 2 layers, width 32 <- 4 layers, width 48, 12 tokens"


FAMILIES: Dict[str, Callable] = {
    "tv_resnet": _tv_resnet,
    "tv_mobilenet": _tv_mobilenet,
    "timm_resnet": _timm_resnet,
    "timm_convnext": _timm_convnext,
    "timm_vit": _timm_vit,
    "timm_swin": _timm_swin,
    "hf_bert": _hf_bert,
    "hf_gpt2": _hf_gpt2,
}


def build(family: str, seed: int = 0) -> ZooCase:
    """Student (train mode), teacher (eval mode), batch and targets of one family."""
    if family not in FAMILIES:
        raise ValueError(f"lwkd_fast.zoo.build: unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        s, t, x, y, note = FAMILIES[family]()
    finally:
        torch.random.set_rng_state(state)
    return ZooCase(family, s.train(), t.eval(), x, y, note)
