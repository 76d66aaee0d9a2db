from .trainer import BaseTrainer

trainer_dict = {"base": BaseTrainer}
