"""train_distill as RepDistiller's helper/loops.py runs it for --distill kd / attention."""

import torch


def train_distill(epoch, train_loader, module_list, criterion_list, optimizer, opt):
    for module in module_list:
        module.train()
    module_list[-1].eval()  # the teacher
    criterion_cls, criterion_div, criterion_kd = criterion_list[0], criterion_list[1], criterion_list[2]
    model_s, model_t = module_list[0], module_list[-1]
    losses = []
    for idx, data in enumerate(train_loader):
        input, target, index = data
        input = input.float()
        feat_s, logit_s = model_s(input, is_feat=True, preact=False)
        with torch.no_grad():
            feat_t, logit_t = model_t(input, is_feat=True, preact=False)
            feat_t = [f.detach() for f in feat_t]
        loss_cls = criterion_cls(logit_s, target)
        loss_div = criterion_div(logit_s, logit_t)
        if opt.distill == "kd":
            loss_kd = 0
        elif opt.distill == "attention":
            g_s = feat_s[1:-1]
            g_t = feat_t[1:-1]
            loss_group = criterion_kd(g_s, g_t)
            loss_kd = sum(loss_group)
        else:
            raise NotImplementedError(opt.distill)
        loss = opt.gamma * loss_cls + opt.alpha * loss_div + opt.beta * loss_kd
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return losses
