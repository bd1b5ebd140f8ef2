"""Training: the jitted step, T LoRA adapters side by side, the host loop, checkpoints."""

from taskpgm_jax.train.adapters import (
                                        AdapterTrainer,
                                        StackedIterator,
                                        init_adapters,
                                        sequential_finetune,
                                        stacked_adapter_shardings,
)
from taskpgm_jax.train.checkpoint import Checkpointer
from taskpgm_jax.train.loop import FinetuneResult, NonFiniteLossError, finetune
from taskpgm_jax.train.step import (
                                        TrainConfig,
                                        Trainer,
                                        TrainState,
                                        chunked_target_token_loss,
                                        lr_schedule,
                                        make_optimizer,
                                        target_token_loss,
                                        train_update,
)

__all__ = ["AdapterTrainer", "Checkpointer", "FinetuneResult", "NonFiniteLossError",
           "StackedIterator", "TrainConfig", "TrainState", "Trainer", "finetune", "init_adapters",
           "lr_schedule", "make_optimizer", "sequential_finetune", "stacked_adapter_shardings",
           "chunked_target_token_loss", "target_token_loss", "train_update"]
