import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """RepDistiller's attention transfer criterion: forward(g_s, g_t) -> one loss per layer, the
    mean squared difference of the L2-normalised maps f.pow(p).mean(1), the larger map pooled."""

    def __init__(self, p=2):
        super().__init__()
        self.p = p

    def forward(self, g_s, g_t):
        return [self.at_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def at_loss(self, f_s, f_t):
        h_s, h_t = f_s.shape[2], f_t.shape[2]
        if h_s > h_t:
            f_s = F.adaptive_avg_pool2d(f_s, (h_t, h_t))
        elif h_s < h_t:
            f_t = F.adaptive_avg_pool2d(f_t, (h_s, h_s))
        return (self.at(f_s) - self.at(f_t)).pow(2).mean()

    def at(self, f):
        return F.normalize(f.pow(self.p).mean(1).view(f.size(0), -1))
