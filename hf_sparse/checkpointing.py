"""Trainer checkpoints of a command's training stages, so that a stopped run continues where it stopped.

A command's training is one or more Trainer runs, its *stages*: the DAM search, then training with the frozen mask;
each fine-tuning run; the Marian's training. Each stage writes its checkpoints under
``OUTPUT_DIR/checkpoints/<stage>`` (the newest one is kept) and, when the run is resumed, starts from the newest:
Trainer restores the weights, optimizer, scheduler, RNG states and the place in the data order, so the stage ends
in the state an uninterrupted run reaches. A stage that had finished is restored from the checkpoint it stopped at
(Trainer saves one at the last step) without a step (:func:`train_stage`); its callbacks' end-of-training work
(``DAMCallback`` freezing the mask) runs again on the same weights. Work outside Trainer (fits, sweeps,
evaluations) is deterministic given the seed and is redone.

The command line's ``--save-steps`` and ``--resume`` (``hf_sparse_cli``) end here; ``OUTPUT_DIR/run.json`` records
the options a run started with, so that a resumed run is the same run.
"""

from __future__ import annotations

import json
import logging
import os
import time

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # under the command's output folder: one sub-folder per stage


def stage_directory(output_dir: str, stage: str) -> str:
    """Where the Trainer of ``stage`` writes its checkpoints."""
    return os.path.join(output_dir, CHECKPOINTS, stage)


def stage_arguments(output_dir: str, stage: str, save_steps: int) -> dict:
    """``TrainingArguments`` keywords for a stage: its checkpoint folder, a checkpoint every ``save_steps`` optimizer
    steps and at the last one, the newest kept; ``save_steps=0`` writes none."""
    if save_steps < 0:
        raise ValueError(f"save_steps must be >= 0 (0: no checkpoints), got {save_steps}")
    if save_steps == 0:
        return {"output_dir": stage_directory(output_dir, stage), "save_strategy": "no"}
    return {
        "output_dir": stage_directory(output_dir, stage),
        "save_strategy": "steps",
        "save_steps": save_steps,
        "save_total_limit": 1,
    }


def resume_point(output_dir: str, stage: str, resume: bool) -> str | None:
    """The checkpoint a stage starts from: its newest when ``resume``, else none (the stage starts afresh)."""
    if not resume:
        return None
    from transformers.trainer_utils import get_last_checkpoint

    folder = stage_directory(output_dir, stage)
    last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    if last is None:
        logger.info(f"{stage}: no checkpoint in {folder}, the stage starts from its beginning")
    else:
        logger.info(f"{stage}: resuming from {last}")
    return last



class LogAtCheckpoints(TrainerCallback):
    """A loss log entry at every checkpoint, so that the logged losses of a resumed run are an uninterrupted run's.

    Trainer's logged loss is the mean since the previous log entry, and a run resumed from a checkpoint starts its
    mean at the checkpoint: a checkpoint between two log entries would make the resumed run's next entry (possibly
    a reported final training loss) the mean of fewer steps. Logging at each checkpoint too, resumed or not,
    starts every mean at a checkpoint in both runs. :func:`train_stage` adds it to every stage.
    """

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # DefaultFlowCallback, called before this one, has decided
            control.should_log = True
        return control


class TrainingClock(TrainerCallback, ExportableState):
    """The seconds a stage has trained, over every process that worked on it: a resumed run reports the time its
    training took, not only the part after the last stop.

    Trainer saves it with each checkpoint (a stateful callback, in ``trainer_state.json``: ``before``, the seconds
    trained up to the checkpoint, as a process resuming from it sees them); :func:`train_stage` reads it back from
    the checkpoint it resumes from, since Trainer restores callback states only when
    ``restore_callback_states_from_checkpoint`` is set (for every callback; then its own restoring gives the same).
    Training redone after the checkpoint (the steps between it and the stop) is not counted twice: only the time
    up to the checkpoint carries over.
    """

    def __init__(self):
        self.before = 0.0  # seconds earlier processes trained, up to the checkpoint this one resumed from
        self._started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Trained so far: the earlier processes' seconds and this one's since its training began."""
        return self.before + (0.0 if self._started is None else time.perf_counter() - self._started)

    def state(self) -> dict:
        return {"args": {}, "attributes": {"before": self.seconds}}

    @staticmethod
    def saved_in(checkpoint: str) -> float:
        """The clock's seconds in a checkpoint (0 for one written before the clock existed)."""
        from transformers.trainer import TRAINER_STATE_NAME

        with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as handle:
            saved = json.load(handle).get("stateful_callbacks", {}).get(TrainingClock.__name__, {})
        return float(saved.get("attributes", {}).get("before", 0.0))


def seconds_trained_before(trainer) -> float:
    """The seconds earlier processes spent in this trainer's stage before the checkpoint it resumed from (0 when
    it started afresh): what a command adds to its own process's time to report a resumed run's time."""
    return sum(c.before for c in trainer.callback_handler.callbacks if isinstance(c, TrainingClock))


def _stopped_at(checkpoint: str) -> bool:
    """Whether training stopped at this checkpoint: the last step, or a callback's stop (the DAM search reaching
    its target), as the checkpoint's saved ``TrainerControl`` says."""
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import TrainerState

    state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    control = state.stateful_callbacks.get("TrainerControl", {}).get("args", {})
    return bool(control.get("should_training_stop")) or state.global_step >= state.max_steps


def _drop_optimizer_state(folder: str) -> None:
    """A finished stage is restored from its final checkpoint's weights and Trainer state alone: its optimizer and
    scheduler state (twice the weights, for Adam) need not fill the disk until the whole run ends."""
    from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCALER_NAME, SCHEDULER_NAME
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(folder) if os.path.isdir(folder) else None
    if last is not None and _stopped_at(last):
        for name in (OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME, SCALER_NAME):
            if os.path.isfile(os.path.join(last, name)):
                os.remove(os.path.join(last, name))


def train_stage(trainer, output_dir: str, stage: str, resume: bool):
    """``trainer.train()`` of a stage, from its newest checkpoint when ``resume`` (:func:`resume_point`).

    Every stage logs its loss at its checkpoints (:class:`LogAtCheckpoints`) and keeps its training time in them
    (:class:`TrainingClock`). A checkpoint written as the stage stopped is the stage's result, and is restored
    rather than resumed:
    Trainer resumed from it would take one step more (transformers 5 checks for the end of training only after a
    step), so a resumed run would drift from an uninterrupted one. Its weights and Trainer state are loaded and the
    callbacks' ``on_train_end`` runs as it did (the progress bar's aside: it never opened).
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_callback import ProgressCallback, TrainerState

    for kind in (LogAtCheckpoints, TrainingClock):
        if not any(isinstance(callback, kind) for callback in trainer.callback_handler.callbacks):
            trainer.add_callback(kind())
    checkpoint = resume_point(output_dir, stage, resume)
    clock = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TrainingClock))
    clock.before = 0.0 if checkpoint is None else TrainingClock.saved_in(checkpoint)
    if checkpoint is None or not _stopped_at(checkpoint):
        trainer.train(resume_from_checkpoint=checkpoint)
        if trainer.args.should_save:  # the process that writes checkpoints (the main one)
            _drop_optimizer_state(stage_directory(output_dir, stage))
        return trainer
    logger.info(f"{stage}: finished at {checkpoint}; restored without training")
    trainer._load_from_checkpoint(checkpoint)  # Trainer's own loader: sharded, safetensors or not
    trainer.state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
    trainer.remove_callback(ProgressCallback)
    trainer.callback_handler.on_train_end(trainer.args, trainer.state, trainer.control)
    return trainer
