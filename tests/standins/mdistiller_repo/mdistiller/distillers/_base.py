import torch.nn as nn
import torch.nn.functional as F


class Distiller(nn.Module):
    """Student + teacher; train() keeps the teacher in eval; forward(**kwargs) dispatches on
    self.training to forward_train(image, target, **kwargs) / forward_test(image)."""

    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = teacher

    def train(self, mode=True):
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for module in self.children():
            module.train(mode)
        self.teacher.eval()
        return self

    def get_learnable_parameters(self):
        return [v for _, v in self.student.named_parameters()]

    def get_extra_parameters(self):
        return 0

    def forward_train(self, **kwargs):
        raise NotImplementedError()

    def forward_test(self, image):
        return self.student(image)[0]

    def forward(self, **kwargs):
        if self.training:
            return self.forward_train(**kwargs)
        return self.forward_test(kwargs["image"])


class Vanilla(Distiller):
    def __init__(self, student):
        nn.Module.__init__(self)
        self.student = student

    def forward_train(self, image, target, **kwargs):
        logits, _ = self.student(image)
        return logits, {"ce": F.cross_entropy(logits, target)}
