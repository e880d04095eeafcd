import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch


def launch_command(port: int) -> list[str]:
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (gloo), up to the script to run."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    return command + ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]


def launch_two_processes(script: str, tmp_path: Path, port: int) -> list[dict]:
    """A child script launched on two CPU processes (:func:`launch_command`); what each rank saved."""
    done = subprocess.run(
        [*launch_command(port), str(Path(__file__).with_name(script)), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def test_dam_search_under_accelerate_launch_two_cpu_processes_keeps_gates_identical(tmp_path):
    ranks = launch_two_processes("distributed_dam_run.py", tmp_path, port=29517)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    assert ranks[0]["steps"] == ranks[1]["steps"] == 6
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    assert torch.equal(ranks[0]["frozen"], ranks[1]["frozen"])
    assert ranks[0]["pattern"] == ranks[1]["pattern"] == "learned"
    assert not torch.equal(ranks[0]["initial"], ranks[0]["logits"])  # the gates were trained


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_kind = a.dtype == b.dtype and a.shape == b.shape
    return same_kind and torch.equal(a.flatten().view(torch.uint8), b.flatten().view(torch.uint8))


def test_sparsefinder_callback_under_accelerate_launch_two_cpu_processes_broadcasts_identical_predictors(tmp_path):
    from hf_sparse.sparsefinder import window_pairs

    ranks = launch_two_processes("distributed_sparsefinder_run.py", tmp_path, port=29531)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["backend"] == "gloo"
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert not torch.equal(ranks[0]["fit_inputs"], ranks[1]["fit_inputs"])  # each rank was handed different data
    assert set(ranks[0]["losses"]) == {0, 1} and all(ranks[0]["losses"].values())  # process 0 fitted both layers
    assert [r["fitted"] for r in ranks] == [True, True]
    state, other = ranks[0]["state"], ranks[1]["state"]
    for layer in (0, 1):
        prefix = f"bert.encoder.layer.{layer}.attention.self.sparsefinder."
        assert {prefix + n for n in ("q_weight", "q_bias", "k_weight", "k_bias", "fitted")} <= set(state)
    assert set(state) == set(other) == set(ranks[0]["initial"])
    assert all(_bitwise_equal(state[k], other[k]) for k in state)
    initial = ranks[0]["initial"]
    assert all(_bitwise_equal(initial[k], ranks[1]["initial"][k]) for k in initial)  # same seed, same start
    assert all(not torch.equal(initial[k], state[k]) for k in state)  # every projection and flag was fitted
    pairs, other_pairs = ranks[0]["pairs"], ranks[1]["pairs"]
    assert set(pairs) == set(other_pairs) == {0, 1}
    beyond_window = ~window_pairs(12, 12, 1)  # the probe is 12 long; the window is 1
    for layer in pairs:
        assert torch.equal(pairs[layer], other_pairs[layer])
        assert (pairs[layer] & beyond_window).any() and not pairs[layer].all()  # the projections predict pairs
