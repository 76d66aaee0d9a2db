"""RepDistiller's train_student.py for --distill kd / attention (CPU, synthetic CIFAR-100-shaped
data, no tensorboard / checkpoints), with the LWKD recipe's edits: the import below, the
attention branch and the optimizer."""

import argparse

import torch
import torch.nn as nn
import torch.optim as optim
from torch.utils.data import DataLoader, TensorDataset

from models import model_dict
from helper.util import adjust_learning_rate
from distiller_zoo import DistillKL, Attention
from helper.loops import train_distill as train
from lwkd_fast.integrations.repdistiller import LayerwiseAttention, feature_layers, make_layerwise_optimizer

LWKD = True  # the stand-in runs both sides: False is upstream's unedited script


def parse_option(argv=None):
    parser = argparse.ArgumentParser("argument for training")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=240)
    parser.add_argument("--learning_rate", type=float, default=0.05)
    parser.add_argument("--lr_decay_epochs", type=str, default="150,180,210")
    parser.add_argument("--lr_decay_rate", type=float, default=0.1)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--model_s", type=str, default="resnet8", choices=list(model_dict))
    parser.add_argument("--path_t", type=str, default=None)
    parser.add_argument("--distill", type=str, default="kd", choices=["kd", "attention"])
    parser.add_argument("-r", "--gamma", type=float, default=1)
    parser.add_argument("-a", "--alpha", type=float, default=None)
    parser.add_argument("-b", "--beta", type=float, default=None)
    parser.add_argument("--kd_T", type=float, default=4)
    opt = parser.parse_args(argv)
    opt.lr_decay_epochs = [int(it) for it in opt.lr_decay_epochs.split(",")]
    opt.model_t = get_teacher_name(opt.path_t)
    return opt


def get_teacher_name(model_path):
    """The teacher's model name from its checkpoint folder, e.g. .../resnet32x4_vanilla/ckpt.pth."""
    segments = model_path.split("/")[-2].split("_")
    return segments[0] if segments[0] != "wrn" else "_".join(segments[:3])


def load_teacher(model_path, n_cls):
    return model_dict[get_teacher_name(model_path)](num_classes=n_cls)  # (upstream loads the checkpoint)


def get_cifar100_dataloaders(batch_size):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 32, 32, generator=g), torch.randint(0, 100, (12,), generator=g)
    return DataLoader(TensorDataset(x, y, torch.arange(12)), batch_size=batch_size, shuffle=False), None, 12


def main(argv=None):
    opt = parse_option(argv)
    train_loader, val_loader, n_data = get_cifar100_dataloaders(batch_size=opt.batch_size)
    n_cls = 100

    model_t = load_teacher(opt.path_t, n_cls)
    model_s = model_dict[opt.model_s](num_classes=n_cls)

    data = torch.randn(2, 3, 32, 32)
    model_t.eval()
    model_s.eval()
    feat_t, _ = model_t(data, is_feat=True)
    feat_s, _ = model_s(data, is_feat=True)

    module_list = nn.ModuleList([])
    module_list.append(model_s)
    trainable_list = nn.ModuleList([])
    trainable_list.append(model_s)

    criterion_cls = nn.CrossEntropyLoss()
    criterion_div = DistillKL(opt.kd_T)
    if opt.distill == 'kd':
        criterion_kd = DistillKL(opt.kd_T)
    elif opt.distill == 'attention' and not LWKD:
        criterion_kd = Attention()
    elif opt.distill == 'attention':
        criterion_kd = LayerwiseAttention()
    else:
        raise NotImplementedError(opt.distill)

    criterion_list = nn.ModuleList([])
    criterion_list.append(criterion_cls)
    criterion_list.append(criterion_div)
    criterion_list.append(criterion_kd)

    # optimizer
    if not LWKD:
        optimizer = optim.SGD(trainable_list.parameters(), lr=opt.learning_rate, momentum=opt.momentum,
                              weight_decay=opt.weight_decay)
    else:
        optimizer = make_layerwise_optimizer("sgd", model_s, feature_layers(model_s, data), data,
                                             lr=opt.learning_rate, momentum=opt.momentum,
                                             weight_decay=opt.weight_decay, source=criterion_kd)

    module_list.append(model_t)
    if torch.cuda.is_available():
        module_list.cuda()
        criterion_list.cuda()

    losses = []
    for epoch in range(1, opt.epochs + 1):
        adjust_learning_rate(epoch, opt, optimizer)
        losses += train(epoch, train_loader, module_list, criterion_list, optimizer, opt)
    return {"model_s": model_s, "model_t": model_t, "optimizer": optimizer, "losses": losses}


if __name__ == "__main__":
    main()
