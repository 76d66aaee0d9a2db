"""BaseTrainer: init_optimizer in __init__, train() over epochs, train_iter as mdistiller's
(zero_grad, distiller(image=, target=, epoch=), sum of the loss means, backward, step) and a
'latest' checkpoint with the optimizer's state dict after every epoch."""

import os

import torch
import torch.optim as optim

from .utils import adjust_learning_rate, validate


class BaseTrainer(object):
    def __init__(self, experiment_name, distiller, train_loader, val_loader, cfg):
        self.cfg = cfg
        self.distiller = distiller
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.optimizer = self.init_optimizer(cfg)
        self.best_acc = -1
        self.log_path = os.path.join(cfg.LOG.PREFIX, experiment_name)
        os.makedirs(self.log_path, exist_ok=True)
        self.losses = []  # (the stand-in's record of every iteration's losses dict)

    def init_optimizer(self, cfg):
        if cfg.SOLVER.TYPE == "SGD":
            return optim.SGD(self.distiller.module.get_learnable_parameters(), lr=cfg.SOLVER.LR,
                             momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        raise NotImplementedError(cfg.SOLVER.TYPE)

    def train(self, resume=False):
        epoch = 1
        if resume:
            state = torch.load(os.path.join(self.log_path, "latest"), weights_only=True)
            epoch = state["epoch"] + 1
            self.distiller.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        while epoch < self.cfg.SOLVER.EPOCHS + 1:
            self.train_epoch(epoch)
            epoch += 1

    def train_epoch(self, epoch):
        adjust_learning_rate(epoch, self.cfg, self.optimizer)
        self.distiller.train()
        for data in self.train_loader:
            self.train_iter(data, epoch)
        self.best_acc = max(self.best_acc, validate(self.val_loader, self.distiller))
        state = {"epoch": epoch, "model": self.distiller.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "best_acc": self.best_acc}
        torch.save(state, os.path.join(self.log_path, "latest"))

    def train_iter(self, data, epoch):
        self.optimizer.zero_grad()
        image, target, index = data
        image = image.float()
        preds, losses_dict = self.distiller(image=image, target=target, epoch=epoch)
        loss = sum([l.mean() for l in losses_dict.values()])
        loss.backward()
        self.optimizer.step()
        self.losses.append({k: v.detach().clone() for k, v in losses_dict.items()})
