from .AT import Attention
from .KD import DistillKL
