"""mdistiller's tools/train.py (CPU, no wandb / cudnn / checkpoint download) with the one line the
LWKD recipe adds among its imports."""

import argparse
import os

import torch

from mdistiller.models import cifar_model_dict
from mdistiller.distillers import distiller_dict
from mdistiller.dataset import get_dataset
from mdistiller.engine.cfg import CFG as cfg
from mdistiller.engine import trainer_dict
from lwkd_fast.integrations.mdistiller import register; register()


def main(cfg, resume, opts):
    experiment_name = cfg.EXPERIMENT.NAME or cfg.EXPERIMENT.TAG
    experiment_name = os.path.join(cfg.EXPERIMENT.PROJECT, experiment_name)
    train_loader, val_loader, num_data, num_classes = get_dataset(cfg)
    net, _pretrain_model_path = cifar_model_dict[cfg.DISTILLER.TEACHER]
    model_teacher = net(num_classes=num_classes)  # (upstream loads the pretrained checkpoint here)
    model_student = cifar_model_dict[cfg.DISTILLER.STUDENT][0](num_classes=num_classes)
    distiller = distiller_dict[cfg.DISTILLER.TYPE](model_student, model_teacher, cfg)
    distiller = torch.nn.DataParallel(distiller)  # (upstream: DataParallel(distiller.cuda()))
    trainer = trainer_dict[cfg.SOLVER.TRAINER](experiment_name, distiller, train_loader, val_loader, cfg)
    trainer.train(resume=resume)
    return trainer


if __name__ == "__main__":
    parser = argparse.ArgumentParser("training for knowledge distillation.")
    parser.add_argument("--cfg", type=str, default="")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("opts", default=None, nargs=argparse.REMAINDER)
    args = parser.parse_args()
    cfg.merge_from_file(args.cfg)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    trainer = main(cfg, args.resume, args.opts)
