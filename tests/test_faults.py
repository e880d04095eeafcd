"""Never lost work: a DAM search and a Sparsefinder fit SIGKILLed mid-run resume from the last Trainer checkpoint
and end in the same state as an uninterrupted run (real processes, real SIGKILL)."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def run(kind, out, *extra, check=True):
    command = [sys.executable, str(HERE / "fault_run.py"), kind, str(out), *extra]
    done = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.parametrize(
    "kind, kill",
    [("dam", ["--kill-at-step", "4"]), ("sparsefinder", ["--kill-at-step", "6"]), ("sparsefinder", ["--kill-in-fit"])],
    ids=["dam search killed after checkpoint 4", "training killed after checkpoint 6", "sparsefinder fit killed"],
)
def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_uninterrupted_state(tmp_path, kind, kill):
    run(kind, tmp_path / "straight")
    killed = run(kind, tmp_path / "killed", *kill, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "final.pt").exists()
    last = max((tmp_path / "killed").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    run(kind, tmp_path / "killed", "--resume", str(last))
    want = torch.load(tmp_path / "straight" / "final.pt")
    got = torch.load(tmp_path / "killed" / "final.pt")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    if kind == "dam":
        assert bool(got["bert.dam.is_frozen"])  # the search ended frozen, as uninterrupted
    else:
        assert all(bool(v) for k, v in got.items() if k.endswith("sparsefinder.fitted"))
