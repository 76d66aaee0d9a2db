import torch


def adjust_learning_rate(epoch, cfg, optimizer):
    """Step decay: LR * LR_DECAY_RATE ** (number of stages passed), written into every group."""
    passed = sum(1 for stage in cfg.SOLVER.LR_DECAY_STAGES if epoch > stage)
    if passed == 0:
        return cfg.SOLVER.LR
    lr = cfg.SOLVER.LR * cfg.SOLVER.LR_DECAY_RATE ** passed
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def validate(val_loader, distiller):
    distiller.eval()
    correct = total = 0
    with torch.no_grad():
        for image, target in val_loader:
            output = distiller(image=image.float())
            correct += int((output.argmax(1) == target).sum())
            total += target.numel()
    return 100.0 * correct / max(total, 1)
