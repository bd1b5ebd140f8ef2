"""Training: the jitted step, T LoRA adapters side by side, the host loop, checkpoints."""

from taskpgm_jax.train.adapters import (AdapterTrainer, StackedIterator, init_adapters,
                                        sequential_finetune)
from taskpgm_jax.train.step import (TrainConfig, Trainer, TrainState, lr_schedule, make_optimizer,
                                    target_token_loss, train_update)

__all__ = ["AdapterTrainer", "StackedIterator", "TrainConfig", "TrainState", "Trainer",
           "init_adapters", "lr_schedule", "make_optimizer", "sequential_finetune",
           "target_token_loss", "train_update"]
