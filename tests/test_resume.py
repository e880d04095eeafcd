"""Never lost work, from the command line: a training command SIGKILLed after one of its checkpoints continues with
``--resume`` and ends with the very weights and metrics of an uninterrupted run (real processes, real SIGKILL);
``--resume`` refuses a folder it cannot continue, naming why."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_sparse_cli

HERE = Path(__file__).parent
REPO = HERE.parent
SMALL_CORPUS = ["--max-sentences", "400", "--eval-sentences", "50", "--max-length", "32", "--batch-size", "8"]


def hf_sparse(*argv, kill: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    """``hf-sparse ARGV`` in a fresh process; ``kill=(stage, step)`` SIGKILLs it after that checkpoint."""
    if kill is None:
        command = [sys.executable, "-c", "import hf_sparse_cli; hf_sparse_cli.main()", *argv]
    else:
        command = [sys.executable, str(HERE / "killed_command.py"), kill[0], str(kill[1]), *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def assert_same_run(straight: Path, resumed: Path) -> None:
    want = load_file(straight / "model" / "model.safetensors")
    got = load_file(resumed / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    for name in ("metrics.json", "config.json"):
        assert (straight / "model" / name).read_text() == (resumed / "model" / name).read_text(), name


DEMO = ["demo", "--steps", "6", "--train-sentences", "300", "--eval-sentences", "40", "--max-length", "32"]


@pytest.mark.parametrize(
    "argv, kill",
    [
        (DEMO, ("mlm", 4)),
        (["dam", "--steps", "8", "--search-steps", "4", *SMALL_CORPUS], ("dam_frozen", 2)),
    ],
    ids=["demo killed after checkpoint 4", "dam killed in training with the frozen mask"],
)
def test_a_killed_command_resumes_to_the_weights_and_metrics_of_an_uninterrupted_run(tmp_path, argv, kill):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = hf_sparse(*argv, "--save-steps", "2", "--out", str(straight))
    assert done.returncode == 0, done.stderr[-3000:]
    done = hf_sparse(*argv, "--save-steps", "2", "--out", str(killed), kill=kill)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert not (killed / "model").exists()
    if kill[0] == "dam_frozen":  # the finished search stage keeps what restoring it needs, not Adam's state
        finished = killed / "checkpoints" / "dam_search" / "checkpoint-4"
        assert (finished / "model.safetensors").exists() and not (finished / "optimizer.pt").exists()
    stage = killed / "checkpoints" / kill[0]
    assert [p.name for p in stage.iterdir()] == [f"checkpoint-{kill[1]}"]  # the newest checkpoint alone is kept
    done = hf_sparse(*argv, "--save-steps", "2", "--out", str(killed), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{kill[0]}: resuming from {stage / f'checkpoint-{kill[1]}'}" in done.stdout
    # only the steps after the checkpoint are trained again (Trainer logs every step at these sizes): 6 - 4, 4 - 2
    assert (done.stdout + done.stderr).count("{'loss': ") == 2
    assert_same_run(straight, killed)
    assert not (killed / "checkpoints").exists() and not (straight / "checkpoints").exists()  # finished: deleted
    done = hf_sparse(*argv, "--save-steps", "2", "--out", str(killed), "--resume")
    assert done.returncode == 2 and "finished; its results are there, nothing is left to do" in done.stderr


def test_the_trained_wordpiece_vocabulary_is_the_same_in_every_process():
    code = (
        "import json, sys; from hf_sparse.data import english_sentences, train_wordpiece_tokenizer; "
        "json.dump(train_wordpiece_tokenizer(english_sentences('de', 5000), 2000).get_vocab(), sys.stdout)"
    )
    vocabularies = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        vocabularies.append(json.loads(done.stdout))
    assert len(vocabularies[0]) == 2000 and vocabularies[0] == vocabularies[1]  # tokens and their ids


def refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        hf_sparse_cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_resume_refuses_a_folder_it_cannot_continue_and_names_why(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "run.json does not exist, so no hf-sparse run started in --output-dir" in refused(
        ["demo", "--out", out, "--resume"], capsys
    )
    parser = hf_sparse_cli.build_parser()
    args = parser.parse_args(["demo", "--steps", "6", "--out", out])
    hf_sparse_cli._start_record(args)
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert recorded["command"] == "demo" and recorded["options"]["steps"] == 6
    err = refused(["demo", "--steps", "8", "--pattern", "window:4", "--out", out, "--resume"], capsys)
    assert "these differ: --pattern was 'bigbird:3,1,2', now 'window:4'; --steps was 6, now 8" in err
    assert "the run in" in refused(["dam", "--out", out, "--resume"], capsys)
    assert "pick one" in refused(["demo", "--steps", "6", "--out", out, "--resume", "--overwrite"], capsys)
    # what may change on resuming: where the folder is, uploading the result
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    hf_sparse_cli.check_arguments(parser, parser.parse_args(["demo", "--steps", "6", "--out", str(moved), "--resume"]))
    out = str(moved)
    upload = ["--push-to-hub", "--hub-model-id", "a/b"]
    args = parser.parse_args(["demo", "--steps", "6", "--out", out, "--resume", *upload])
    hf_sparse_cli.check_arguments(parser, args)


def test_a_fresh_run_with_overwrite_deletes_the_earlier_runs_checkpoints(tmp_path):
    stale = tmp_path / "checkpoints" / "mlm" / "checkpoint-900"
    stale.mkdir(parents=True)
    (tmp_path / "kept.txt").write_text("other work")
    args = hf_sparse_cli.build_parser().parse_args(["demo", "--out", str(tmp_path), "--overwrite"])
    hf_sparse_cli._start_record(args)
    assert stale.exists()  # no run.json: a folder of something else, whose checkpoints are not ours to delete
    hf_sparse_cli._start_record(args)  # now an earlier hf-sparse run's folder
    assert not (tmp_path / "checkpoints").exists()  # --resume would have taken it for this run's
    assert (tmp_path / "kept.txt").exists() and (tmp_path / "run.json").exists()


def test_an_interrupted_run_says_how_to_continue_it(tmp_path, monkeypatch):
    import hf_sparse.cli

    def interrupted(args):  # Ctrl-C after the first checkpoint of a stage
        (tmp_path / "checkpoints" / "mlm" / "checkpoint-2").mkdir(parents=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_sparse.cli, "cmd_demo", interrupted)
    with pytest.raises(SystemExit) as info:
        hf_sparse_cli.main(["demo", "--steps", "6", "--out", str(tmp_path), "--overwrite"])
    assert str(info.value.code) == (
        f"hf-sparse demo: interrupted; its checkpoints are in {tmp_path / 'checkpoints'}: continue it with "
        f"hf-sparse demo --steps 6 --out {tmp_path} --resume"
    )
    monkeypatch.setattr(hf_sparse.cli, "cmd_demo", lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # no checkpoint yet: nothing to continue, the interrupt goes on
        hf_sparse_cli.main(["demo", "--out", str(tmp_path / "fresh")])


def test_the_training_clock_survives_trainers_own_restoring_of_callback_states():
    """With ``restore_callback_states_from_checkpoint=True`` Trainer rebuilds each stateful callback as
    ``type(cb)(**args)`` and sets its saved attributes (``Trainer._load_callback_state``): the clock must accept
    that and carry the saved seconds on, as ``train_stage``'s own reading does."""
    import time

    from hf_sparse.checkpointing import TrainingClock

    clock = TrainingClock()
    clock.on_train_begin(None, None, None)
    time.sleep(0.01)
    saved = json.loads(json.dumps(clock.state()))  # as trainer_state.json keeps it
    rebuilt = type(clock)(**saved["args"])
    for attribute, value in saved["attributes"].items():
        setattr(rebuilt, attribute, value)
    assert rebuilt.seconds >= 0.01 and rebuilt.before == saved["attributes"]["before"]
    rebuilt.on_train_begin(None, None, None)
    time.sleep(0.01)
    assert rebuilt.seconds >= rebuilt.before + 0.01
