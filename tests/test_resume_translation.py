"""Never lost work in machine translation: ``hf-sparse sparsefinder --task translation`` SIGKILLed after a checkpoint
of the Marian's training continues with ``--resume`` and ends bit for bit as an uninterrupted run: the saved weights
with the fitted predictors, metrics.json, the dev sweep and the training loss log (real processes, real SIGKILL)."""

import json
import re
import signal
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_resume import hf_sparse  # this folder is on sys.path under pytest

from hf_sparse.data import gettext_pairs

HERE = Path(__file__).parent
REPO = HERE.parent
# 20 steps log the loss every 2 steps; checkpoints every 3 fall between log entries (step 9: the kill), the case
# where a resumed Trainer's loss log would differ unless a checkpoint also logs
TINY = ["--steps", "20", "--save-steps", "3", "--learning-rate", "5e-3", "--batch-size", "8", "--max-length", "24"]
TINY += ["--d-model", "32", "--vocab-size", "300", "--dev-size", "12", "--test-size", "12", "--fit-sentences", "24"]
TINY += ["--epochs", "1", "--validation-size", "0.1"]
KILL_STEP = 9


def printed_losses(done: subprocess.CompletedProcess) -> list[str]:
    """The loss log entries a process printed (Trainer prints each one it logs, rounded): what it trained itself."""
    return re.findall(r"\{'loss': [^}]*\}", done.stdout + done.stderr)


def test_a_translation_run_killed_twice_resumes_to_the_weights_metrics_and_losses_of_an_uninterrupted_run(tmp_path):
    """Killed after checkpoint 9 (mid-training), resumed and killed after checkpoint 20 (training done, before the
    fit), resumed again: the second resume restores the finished training without a step."""
    pairs = [(s, t) for s, t in gettext_pairs("de") if 3 <= len(s.split()) <= 8][:300]
    lines = ["source,target", *(f'"{s.replace(chr(34), "")}","{t.replace(chr(34), "")}"' for s, t in pairs)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    argv = ["sparsefinder", "--task", "translation", "--train-file", str(tmp_path / "pairs.csv"), *TINY]
    straight, killed = tmp_path / "straight", tmp_path / "killed"

    done = hf_sparse(*argv, "--out", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    losses = printed_losses(done)
    assert len(losses) == 10 + 3  # every 2 steps, and at the checkpoints between: 3, 9, 15

    runs = []
    for extra, kept in (((), KILL_STEP), (("--resume",), 20)):
        runs.append(done := hf_sparse(*argv, "--out", str(killed), *extra, kill=("marian", kept)))
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        assert not (killed / "model").exists()
        assert [p.name for p in (killed / "checkpoints" / "marian").iterdir()] == [f"checkpoint-{kept}"]
    runs.append(done := hf_sparse(*argv, "--out", str(killed), "--resume"))
    assert done.returncode == 0, done.stderr[-3000:]

    # Each process trained only the steps after its checkpoint (the first resume 10..20, the second none), and
    # together they logged the uninterrupted run's losses.
    printed = [printed_losses(done) for done in runs]
    assert [len(p) for p in printed] == [6, 7, 0]  # steps 2, 3, 4, 6, 8, 9 | 10, 12, 14, 15, 16, 18, 20 | -
    assert sum(printed, []) == losses
    # ... and the run ended in the uninterrupted run's state.
    want = load_file(straight / "model" / "model.safetensors")
    got = load_file(killed / "model" / "model.safetensors")
    assert want.keys() == got.keys() and any(".sparsefinder.q_weight" in name for name in want)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    metrics = json.loads((straight / "model" / "metrics.json").read_text())
    assert metrics["training_steps"] == 20 and metrics["dev_gold_sparsity"] > 0  # trained far enough for entmax
    assert json.loads((killed / "model" / "metrics.json").read_text()) == metrics  # final_training_loss included
    assert (killed / "pareto.csv").read_text() == (straight / "pareto.csv").read_text()
