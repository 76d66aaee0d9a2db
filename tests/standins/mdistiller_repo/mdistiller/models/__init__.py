"""cifar_model_dict: name -> (model class, pretrained checkpoint path); tiny nets under
mdistiller's names in its CIFAR ResNet conventions: each stage returns (out, preact) from its last
block, and the model returns (logits, {"feats", "preact_feats", "pooled_feat"})."""

import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        pre = self.bn(self.conv(x))
        return F.relu(pre), pre


class TinyResNet(nn.Module):
    def __init__(self, width, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Block(width, width, 1))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2))
        self.layer3 = nn.Sequential(Block(2 * width, 4 * width, 2))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, f1_pre = self.layer1(x)
        f1 = x
        x, f2_pre = self.layer2(x)
        f2 = x
        x, f3_pre = self.layer3(x)
        f3 = x
        avg = self.avgpool(x).reshape(x.size(0), -1)
        feats = {"feats": [f0, f1, f2, f3], "preact_feats": [f0, f1_pre, f2_pre, f3_pre], "pooled_feat": avg}
        return self.fc(avg), feats


def resnet8x4(num_classes=100):
    return TinyResNet(4, num_classes)


def resnet32x4(num_classes=100):
    return TinyResNet(8, num_classes)


cifar_model_dict = {"resnet8x4": (resnet8x4, None), "resnet32x4": (resnet32x4, "teacher.pth")}
