import torch.nn as nn
import torch.nn.functional as F


class Distiller(nn.Module):
    """The behaviour of mdistiller's base class that its trainer and distillers rely on: student +
    teacher; train() keeps the teacher in eval; forward(**kwargs) dispatches on self.training to
    forward_train(image, target, **kwargs) / forward_test(image)."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student, self.teacher = student, teacher

    def train(self, mode=True):
        super().train(mode)  # (refuses a non-bool mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self):
        return list(self.student.parameters())

    def get_extra_parameters(self):
        return 0

    def forward_test(self, image):
        return self.student(image)[0]

    def forward(self, **kwargs):
        return self.forward_train(**kwargs) if self.training else self.forward_test(kwargs["image"])


class Vanilla(Distiller):
    def __init__(self, student):
        nn.Module.__init__(self)
        self.student = student

    def forward_train(self, image, target, **kwargs):
        logits, _ = self.student(image)
        return logits, {"ce": F.cross_entropy(logits, target)}
