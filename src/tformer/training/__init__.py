"""Training: loss, learning-rate schedule, optimizer, the Trainer loop, checkpoints and averaging.

trainer = start_run(experiment, run_dir)      # or resume_run(run_dir)
result = trainer.train()                      # once; to go on (after an interrupt too): resume_run(run_dir).train()
run = load_run(run_dir)                       # model (eval mode), tokenizer, experiment
"""

from tformer.training.checkpoint import CheckpointError
from tformer.training.checkpoint_load import LoadedRun, load_run
from tformer.training.loop import Trainer, TrainingData, TrainingDivergedError, TrainingInterrupted, TrainResult
from tformer.training.loss import LossSums, label_smoothed_loss
from tformer.training.resume import resume_run
from tformer.training.run import start_run
from tformer.training.run_directory import RunDirectoryError
from tformer.training.schedule import inverse_sqrt_lr, learning_rate, peak_lr

__all__ = [
    "CheckpointError",
    "LoadedRun",
    "LossSums",
    "RunDirectoryError",
    "TrainResult",
    "Trainer",
    "TrainingData",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "inverse_sqrt_lr",
    "label_smoothed_loss",
    "learning_rate",
    "load_run",
    "peak_lr",
    "resume_run",
    "start_run",
]
