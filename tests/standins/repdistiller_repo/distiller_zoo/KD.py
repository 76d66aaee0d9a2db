import torch.nn as nn
import torch.nn.functional as F


class DistillKL(nn.Module):
    """Hinton KD: KL(softmax(t/T) || log_softmax(s/T)) * T^2 / batch."""

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s, y_t):
        p_s = F.log_softmax(y_s / self.T, dim=1)
        p_t = F.softmax(y_t / self.T, dim=1)
        return F.kl_div(p_s, p_t, reduction="sum") * (self.T ** 2) / y_s.shape[0]
