"""``hf-sparse finetune`` SIGKILLed in its last training stage and rerun with ``--resume`` ends bit-identical to an
uninterrupted run, without redoing the training that had finished (real processes, real SIGKILL)."""

import csv
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import BertModel

from conftest import WORDS, tiny_bert_config, tiny_tokenizer

HERE = Path(__file__).parent
RUNS = ("dense", "pattern", "dam")


def _write_task(folder: Path) -> None:
    """A tiny BERT checkpoint with its tokenizer, and a two-class CSV task (the label's word is in the text)."""
    torch.manual_seed(0)
    BertModel(tiny_bert_config(max_position_embeddings=32)).save_pretrained(folder / "model")
    tiny_tokenizer().save_pretrained(folder / "model")
    rng = random.Random(0)
    for split, n in (("train", 48), ("validation", 12)):
        with open(folder / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for _ in range(n):
                label = rng.choice(["pos", "neg"])
                words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
                writer.writerow([" ".join([*words, "good" if label == "pos" else "bad"]), label])


def _finetune(folder: Path, out: str, *extra: str, kill: tuple[str, int] | None = None):
    options = [
        "finetune",
        *("--model", "model", "--train-file", "train.csv", "--validation-file", "validation.csv"),
        *("--runs", *RUNS, "--pattern", "window:1", "--steps", "12", "--save-steps", "2"),
        *("--batch-size", "8", "--max-length", "16", "--learning-rate", "1e-3"),
        # the search's budget is 6 steps; these gates reach the target at step 4, a checkpoint step: the stop's
        # own checkpoint must be restored as the search's end, not resumed for more steps
        *("--search-fraction", "0.5", "--target-sparsity", "0.3", "--penalty", "0.3", "--gate-lr", "0.5"),
        *("--output-dir", out, *extra),
    ]
    if kill is None:
        command = [sys.executable, "-c", "import sys, hf_sparse_cli; hf_sparse_cli.main(sys.argv[1:])", *options]
    else:
        command = [sys.executable, str(HERE / "killed_command.py"), kill[0], str(kill[1]), *options]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)


def test_finetune_killed_in_the_dam_training_resumes_to_the_uninterrupted_result(tmp_path):
    _write_task(tmp_path)
    straight = _finetune(tmp_path, "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = _finetune(tmp_path, "killed", kill=("dam_frozen", 4))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    out = tmp_path / "killed"
    assert (out / "dense" / "model.safetensors").exists() and not (out / "dam").exists()
    stages = {p.name: sorted(c.name for c in p.iterdir()) for p in (out / "checkpoints").iterdir()}
    assert stages == {
        "dense": ["checkpoint-12"],
        "pattern": ["checkpoint-12"],
        "dam_search": ["checkpoint-4"],  # stopped early, at the target sparsity
        "dam_frozen": ["checkpoint-4"],
    }
    interrupted = load_file(out / "checkpoints" / "dam_frozen" / "checkpoint-4" / "model.safetensors")
    # the training time each stage's checkpoint carries (Trainer's stateful callbacks): the killed process's
    trained = {
        stage: json.loads((out / "checkpoints" / stage / f"checkpoint-{step}" / "trainer_state.json").read_text())[
            "stateful_callbacks"
        ]["TrainingClock"]["attributes"]["before"]
        for stage, step in (("dense", 12), ("pattern", 12), ("dam_search", 4), ("dam_frozen", 4))
    }
    assert all(seconds > 0 for seconds in trained.values()), trained

    resumed = _finetune(tmp_path, "killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage, step in (("dense", 12), ("pattern", 12), ("dam_search", 4), ("dam_frozen", 4)):
        where = Path("killed", "checkpoints", stage, f"checkpoint-{step}")  # as given: relative to the run's folder
        assert f"{stage}: resuming from {where}" in resumed.stdout
    # the finished stages are restored, not trained again: only dam_frozen's last 4 steps run (Trainer logs every
    # step at these sizes; the uninterrupted run logs all 12 + 12 + 4 + 8)
    assert (straight.stdout + straight.stderr).count("{'loss': ") == 36
    assert (resumed.stdout + resumed.stderr).count("{'loss': ") == 4
    assert not (out / "checkpoints").exists()  # a finished run deletes them

    for run in RUNS:
        want = load_file(tmp_path / "straight" / run / "model.safetensors")
        got = load_file(out / run / "model.safetensors")
        assert want.keys() == got.keys(), run
        for name in want:
            assert torch.equal(want[name], got[name]), (run, name)
        metrics = [json.loads((folder / run / "metrics.json").read_text()) for folder in (tmp_path / "straight", out)]
        for row in metrics:
            row.pop("seconds")  # the one field that is no result
        assert metrics[0] == metrics[1], run
    # a resumed run's time includes the training the killed process did (the finished runs' in full), not only
    # the restore and evaluation this process redid
    seconds = {run: json.loads((out / run / "metrics.json").read_text())["seconds"] for run in RUNS}
    assert seconds["dense"] >= trained["dense"] - 0.05 and seconds["pattern"] >= trained["pattern"] - 0.05
    assert seconds["dam"] >= trained["dam_search"] + trained["dam_frozen"] - 0.1, (seconds, trained)
    final = load_file(out / "dam" / "model.safetensors")
    assert json.loads((out / "dam" / "metrics.json").read_text())["dam_search_steps"] == 4
    # the resumed stage trained on: its 4 remaining steps changed the weights of the killed run's checkpoint
    assert any(not torch.equal(final[name], interrupted[name]) for name in final if name in interrupted)
