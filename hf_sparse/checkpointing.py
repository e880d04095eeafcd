"""Trainer checkpoints of a command's training stages, so that a stopped run continues where it stopped.

A command's training is one or more Trainer runs, its *stages*: the DAM search, then training with the frozen mask;
each fine-tuning run; the Marian's training. Each stage writes its checkpoints under
``OUTPUT_DIR/checkpoints/<stage>`` (the newest one is kept) and, when the run is resumed, starts from the newest:
Trainer restores the weights, optimizer, scheduler, RNG states and the place in the data order, so the stage ends
in the state an uninterrupted run reaches. A stage that had finished resumes from its final checkpoint (Trainer
saves one at the last step) and takes no step; its callbacks' end-of-training work (``DAMCallback`` freezing the
mask) runs again on the same weights. Work outside Trainer (fits, sweeps, evaluations) is deterministic given the
seed and is redone.

The command line's ``--save-steps`` and ``--resume`` (``hf_sparse_cli``) end here; ``OUTPUT_DIR/run.json`` records
the options a run started with, so that a resumed run is the same run.
"""

from __future__ import annotations

import logging
import os

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

