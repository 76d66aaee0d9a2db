"""get_dataset(cfg) -> (train_loader, val_loader, num_data, num_classes); synthetic CIFAR-100-shaped
data (3x32x32, 100 classes), train batches (image, target, index) as mdistiller's loaders give."""

import torch
from torch.utils.data import DataLoader, Dataset

NUM_TRAIN = 12


class _Synthetic(Dataset):
    def __init__(self, n, seed, with_index):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, 100, (n,), generator=g)
        self.with_index = with_index

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.x[i], self.y[i], i) if self.with_index else (self.x[i], self.y[i])


def get_dataset(cfg):
    train = DataLoader(_Synthetic(NUM_TRAIN, 0, True), batch_size=cfg.SOLVER.BATCH_SIZE, shuffle=False)
    val = DataLoader(_Synthetic(4, 1, False), batch_size=cfg.DATASET.TEST.BATCH_SIZE, shuffle=False)
    return train, val, NUM_TRAIN, 100
