"""Run an ``hf-sparse`` command that SIGKILLs itself right after one of its Trainer checkpoints is written, as a
machine that goes down mid-run would leave it (the resume tests run this in a subprocess).

    python killed_command.py STAGE STEP hf-sparse-arguments...

STAGE is the training stage's checkpoint folder name (``OUTPUT_DIR/checkpoints/<STAGE>``), STEP the global step of
the checkpoint after which the process dies.
"""

import os
import signal
import sys

from transformers import Trainer, TrainerCallback

import hf_sparse_cli

stage, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]


class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if os.path.basename(os.path.normpath(args.output_dir)) == stage and state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)


original_init = Trainer.__init__


def init_with_kill(self, *args, **kwargs):
    original_init(self, *args, **kwargs)
    self.add_callback(KillAfterSave())


Trainer.__init__ = init_with_kill
hf_sparse_cli.main(argv)
