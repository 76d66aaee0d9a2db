"""mdistiller's AT: loss_ce = CE_WEIGHT * CE, loss_kd = FEAT_WEIGHT * sum over feats[1:] of the
mean squared difference of the L2-normalised maps feat.pow(P).mean(1), the larger map pooled."""

import torch
import torch.nn.functional as F

from ._base import Distiller


def _attention(feat, p):
    return F.normalize(feat.pow(p).mean(1).reshape(feat.size(0), -1))


def single_stage_at_loss(f_s, f_t, p):
    h_s, h_t = f_s.shape[2], f_t.shape[2]
    if h_s > h_t:
        f_s = F.adaptive_avg_pool2d(f_s, (h_t, h_t))
    elif h_s < h_t:
        f_t = F.adaptive_avg_pool2d(f_t, (h_s, h_s))
    return (_attention(f_s, p) - _attention(f_t, p)).pow(2).mean()


def at_loss(g_s, g_t, p):
    return sum(single_stage_at_loss(f_s, f_t, p) for f_s, f_t in zip(g_s, g_t))


class AT(Distiller):
    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher)
        self.p = cfg.AT.P
        self.ce_loss_weight = cfg.AT.LOSS.CE_WEIGHT
        self.feat_loss_weight = cfg.AT.LOSS.FEAT_WEIGHT

    def forward_train(self, image, target, **kwargs):
        logits_student, feature_student = self.student(image)
        with torch.no_grad():
            _, feature_teacher = self.teacher(image)
        loss_ce = self.ce_loss_weight * F.cross_entropy(logits_student, target)
        loss_feat = self.feat_loss_weight * at_loss(feature_student["feats"][1:], feature_teacher["feats"][1:], self.p)
        return logits_student, {"loss_ce": loss_ce, "loss_kd": loss_feat}
