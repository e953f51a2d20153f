"""Training: a task-agnostic :class:`Trainer` (:mod:`.trainer`) runs a :class:`~bitdance.training.tasks.Task`
(the tokenizer and the class-conditional generator in :mod:`.tasks`, text-to-image in :mod:`.t2i`) with the
options of :mod:`.config`; ``python -m bitdance.training`` alone or under torchrun."""

from bitdance.training.config import TrainConfig, TrainingError, add_train_args, config_from_args
from bitdance.training.t2i import T2ITask
from bitdance.training.tasks import GeneratorTask, Task, TokenizerTask, generate_class_grid
from bitdance.training.trainer import Trainer, main, train

__all__ = ["GeneratorTask", "T2ITask", "Task", "TokenizerTask", "TrainConfig", "Trainer", "TrainingError",
           "add_train_args", "config_from_args", "generate_class_grid", "main", "train"]
