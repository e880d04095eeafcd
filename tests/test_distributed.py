import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch


def test_dam_search_under_accelerate_launch_two_cpu_processes_keeps_gates_identical(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    script = Path(__file__).with_name("distributed_dam_run.py")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    done = subprocess.run(
        [*command, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    assert torch.equal(ranks[0]["frozen"], ranks[1]["frozen"])
    assert ranks[0]["pattern"] == ranks[1]["pattern"] == "learned"
    assert not torch.equal(ranks[0]["initial"], ranks[0]["logits"])  # the gates were trained
