"""model_dict with tiny nets under RepDistiller's names, in RepDistiller's model conventions:
forward(x, is_feat=False, preact=False); every stage returns (out, preact) from its last block;
with is_feat the model returns ([f0, f1, f2, f3, pooled], logits)."""

import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, is_last):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.is_last = is_last

    def forward(self, x):
        pre = self.bn(self.conv(x))
        out = F.relu(pre)
        return (out, pre) if self.is_last else out


class TinyResNet(nn.Module):
    def __init__(self, width, num_classes=100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Block(width, width, 1, True))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2, True))
        self.layer3 = nn.Sequential(Block(2 * width, 4 * width, 2, True))
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x, is_feat=False, preact=False):
        x = self.relu(self.bn1(self.conv1(x)))
        f0 = x
        x, f1_pre = self.layer1(x)
        f1 = x
        x, f2_pre = self.layer2(x)
        f2 = x
        x, f3_pre = self.layer3(x)
        f3 = x
        x = self.avgpool(x)
        x = x.view(x.size(0), -1)
        f4 = x
        x = self.fc(x)
        if is_feat:
            return ([f0, f1_pre, f2_pre, f3_pre, f4] if preact else [f0, f1, f2, f3, f4]), x
        return x


def resnet8x4(num_classes=100):
    return TinyResNet(4, num_classes)


def resnet32x4(num_classes=100):
    return TinyResNet(8, num_classes)


model_dict = {"resnet8x4": resnet8x4, "resnet32x4": resnet32x4}
