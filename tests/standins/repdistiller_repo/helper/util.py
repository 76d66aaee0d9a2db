def adjust_learning_rate(epoch, opt, optimizer):
    """Step decay of opt.learning_rate at opt.lr_decay_epochs, written into every group."""
    passed = sum(1 for e in opt.lr_decay_epochs if epoch > e)
    if passed > 0:
        for group in optimizer.param_groups:
            group["lr"] = opt.learning_rate * (opt.lr_decay_rate ** passed)
