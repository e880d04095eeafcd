"""README.md is what users copy: every Python snippet runs as written (each in a fresh process, in an empty
folder, offline), every ``hf-sparse`` command line in it is accepted by the command's grammar, and it points to
nothing users do not have."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hub_server import HubServer

import hf_sparse_cli
from conftest import tiny_kwargs, tiny_tokenizer

README = (Path(__file__).parent.parent / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)
SHELL = "\n".join(re.findall(r"```bash\n(.*?)```", README, re.S))
INLINE = re.findall(r"`(hf-sparse [^`]*)`", README)


def _first_line(snippet: str) -> str:
    return next(line for line in snippet.splitlines() if line.strip() and not line.startswith(("import", "from")))


def test_the_readme_has_snippets_to_check():
    assert len(SNIPPETS) >= 4 and len(INLINE) >= 10


def _saved_dam_checkpoint(folder: Path) -> None:
    """What ``hf-sparse dam`` leaves in ``outputs/dam/model``, on a tiny model: a frozen mask, tokenizer, card."""
    from hf_sparse import SparseBertConfig, SparseBertForMaskedLM
    from hf_sparse.cards import save_with_card

    dam = {"structure": "offset", "max_length": 32}
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:6", dam=dam)))
    model.freeze_dam()
    save_with_card(model, tiny_tokenizer(), folder, {"held_out_mlm_accuracy": 0.5})


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[_first_line(s)[:40] for s in SNIPPETS])
def test_every_python_snippet_runs_as_written(snippet, tmp_path):
    """Offline; a snippet that shares a checkpoint gets the folder it names and the local Hub server as the Hub."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    with HubServer(tmp_path / "hub") as hub:
        if "push_checkpoint(" in snippet:
            _saved_dam_checkpoint(tmp_path / "outputs" / "dam" / "model")
            env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0")
        done = subprocess.run(
            [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
    assert done.returncode == 0, done.stderr[-4000:]


def _command_lines() -> list[str]:
    lines = [line.split("  #")[0].strip() for line in SHELL.splitlines()]
    found = [part.strip() for line in lines for part in line.split("&&") if part.strip().startswith("hf-sparse ")]
    return [line for line in found + INLINE if "<" not in line and "--help" not in line]


@pytest.mark.parametrize("line", _command_lines())
def test_every_command_line_is_accepted_by_the_grammar(line):
    """Optional parts written ``[...]`` are left out; of a choice written ``a|b`` the first is taken."""
    words = shlex.split(re.sub(r"\[[^\]]*\]", "", line).replace("\\|", "|"))[1:]
    hf_sparse_cli.build_parser().parse_args([word.split("|")[0] for word in words if word != "…"])


def test_the_readme_points_to_nothing_users_do_not_have():
    for private in ("REFERENCES.md", "DESIGN.md", "STYLE.md", "HUB.md", "../shared"):
        assert private not in README, private
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (Path(__file__).parent.parent / link).exists(), link
