"""The Hub round trip, for real: every model kind is pushed with the real huggingface_hub/transformers clients to a
Hub-API server on 127.0.0.1 (tests/hub_server.py), then loaded by repo id with ``trust_remote_code=True`` in a
process that cannot import hf_sparse, and must compute bit-identical outputs, old revisions included.

Clients read ``HF_ENDPOINT`` when huggingface_hub is imported, so every client step runs in a subprocess with the
server's endpoint and a fresh ``HF_HOME``. The expensive part (4 kinds × 2 versions, one pushing process, one
loading process) runs once per module; the tests below read its results.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_server import HubServer
from huggingface_hub import HfApi, ModelCard, hf_hub_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from conftest import random_batch, tiny_kwargs, tiny_tokenizer
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM, SparseBertForSequenceClassification
from hf_sparse.cards import write_card
from hf_sparse.hub import check_checkpoint, push_checkpoint

KINDS = ["pattern", "dam", "sparsefinder", "marian"]
AUTO = {
    "pattern": "AutoModelForSequenceClassification",
    "dam": "AutoModelForMaskedLM",
    "sparsefinder": "AutoModelForMaskedLM",
    "marian": "AutoModelForSeq2SeqLM",
}

# Pushes with hf_sparse importable. argv: jobs.json (kind -> the two saved folders), result.json (the commit ids).
# Version 1 through transformers' own push_to_hub, version 2 likewise but with a repo id without namespace (the
# server's 409-with-url answer gives the client the full id), the saved folder with its card through push_checkpoint
# (for one kind, version 2 also to a branch).
PUSH = textwrap.dedent(
    """
    import json, sys
    import hf_sparse
    from hf_sparse.hub import push_checkpoint

    jobs, result = json.load(open(sys.argv[1])), {}
    for kind, (first, second) in jobs.items():
        done = {}
        for version, folder, repo_id in ((1, first, f"user/{kind}"), (2, second, kind)):
            architecture = json.load(open(f"{folder}/config.json"))["architectures"][0]
            model = getattr(hf_sparse, architecture).from_pretrained(folder)
            done[version] = model.push_to_hub(repo_id, commit_message=f"{kind} v{version}").oid
        done["card"] = push_checkpoint(first, f"user/{kind}-card").oid
        if kind == "dam":  # version 2 to a new branch of the same repo: main keeps version 1
            done["branch"] = push_checkpoint(second, f"user/{kind}-card", revision="dev").oid
        result[kind] = done
    json.dump(result, open(sys.argv[2], "w"))
    """
)

# Loads by repo id where hf_sparse cannot be imported. argv: expected.pt, commits.json, report.json.
# Compares with torch.equal here and reports per check: True, or what differed / the error.
LOAD = textwrap.dedent(
    """
    import json, sys, traceback
    sys.modules["hf_sparse"] = None  # any import of hf_sparse now raises ImportError
    sys.path = [p for p in sys.path if p not in ("", ".") and "hf_sparse" not in p]
    import torch
    import transformers
    from huggingface_hub.errors import RepositoryNotFoundError

    expected, commits, report = torch.load(sys.argv[1]), json.load(open(sys.argv[2])), {}

    def check(kind, repo_id, revision, version):
        want = expected[kind]
        model = getattr(transformers, want["auto"]).from_pretrained(repo_id, revision=revision, trust_remote_code=True)
        if not type(model).__module__.startswith("transformers_modules"):
            return f"class from {type(model).__module__}, not the repo's code"
        state, want_state = model.state_dict(), want[f"state{version}"]
        if state.keys() != want_state.keys():
            return f"state dict keys differ: {sorted(state.keys() ^ want_state.keys())}"
        differing = [k for k in state if not torch.equal(state[k], want_state[k])]
        if differing:
            return f"state dict values differ: {differing}"
        with torch.no_grad():
            logits = model.eval()(**want["inputs"]).logits
        return True if torch.equal(logits, want[f"logits{version}"]) else "logits differ"

    for kind, sha in commits.items():
        for label, repo_id, revision, version in (
            ("latest", f"user/{kind}", None, 2),
            ("first_commit", f"user/{kind}", sha["1"], 1),
            ("push_checkpoint", f"user/{kind}-card", None, 1),
            *([("branch", f"user/{kind}-card", "dev", 2)] if "branch" in sha else []),
        ):
            try:
                report[f"{kind}/{label}"] = check(kind, repo_id, revision, version)
            except Exception:
                report[f"{kind}/{label}"] = traceback.format_exc()[-2000:]
        if "words" in expected[kind]:  # the tokenizer saved next to the card comes back too
            tokenizer = transformers.AutoTokenizer.from_pretrained(f"user/{kind}-card")
            report[f"{kind}/tokenizer"] = tokenizer(expected[kind]["words"])["input_ids"] == expected[kind]["ids"]
    try:
        transformers.AutoModel.from_pretrained("user/missing", trust_remote_code=True)
        report["missing"] = "loaded a missing repo"
    except OSError as error:
        causes = [error.__cause__, error.__context__]
        report["missing"] = any(isinstance(c, RepositoryNotFoundError) for c in causes) or repr(causes)
    json.dump(report, open(sys.argv[3], "w"))
    """
)


def client_env(hub: HubServer, home) -> dict:
    """The server as the Hub, a fresh cache, no token, online; no PYTHONPATH (the loader must not see hf_sparse)."""
    drop = ("PYTHONPATH", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HF_MODULES_CACHE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(home),
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    return env


def run_client(script: str, args: list, env: dict, cwd) -> None:
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]


# ---- the models: version 1 as built, version 2 with one change that alters the outputs ------------------------


def _pattern_models():
    config = SparseBertConfig(**tiny_kwargs(attention_pattern="bigbird:3,1,2", num_labels=3))
    first = SparseBertForSequenceClassification(config).eval()
    second = SparseBertForSequenceClassification(
        SparseBertConfig(**tiny_kwargs(attention_pattern="window:2", num_labels=3))
    ).eval()
    second.load_state_dict(first.state_dict())  # same weights, another pattern
    return first, second


def _dam_models():
    dam = {"structure": "element", "share_across_layers": False, "max_length": 32, "init_noise": 1.0}
    first = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:6", dam=dam))).eval()
    assert first.freeze_dam() == "window:6&learned"
    return first, None


def _sparsefinder_models():
    from test_sparsefinder_bert import entmax_bert, loader

    from hf_sparse.sparsefinder_fit import fit

    first = entmax_bert(threshold=0.6)
    fit(first, loader(), epochs=2, progress=False)
    first.config.sparsefinder["enabled"] = True
    return first, None


def _marian_models():
    from test_sparsefinder_marian import loader, model_with

    from hf_sparse.sparsefinder_fit import fit

    first = model_with(threshold=0.7)
    fit(first, loader(), epochs=3, progress=False)
    first.config.sparsefinder["enabled"] = True
    return first, None


def _changed_copy(model):
    """The same model with its word embeddings changed (a new training step, say). Not Marian's sinusoidal position
    table: Marian recomputes that at load, as stock Marian does."""
    import copy

    second = copy.deepcopy(model)
    with torch.no_grad():
        second.get_input_embeddings().weight.add_(0.25)
    return second


def _inputs(kind: str) -> dict:
    if kind == "marian":
        from test_modeling_entmax_marian import batch

        ids, mask, decoder = batch()
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}
    ids, mask = random_batch()
    return {"input_ids": ids, "attention_mask": mask}


def _save(model, folder, kind: str) -> None:
    """As the CLI saves a run: weights + code, tokenizer, metrics.json, the card and its images."""
    model.save_pretrained(folder)
    plots = {}
    if kind in ("sparsefinder", "marian"):  # the CLI copies its Pareto plot next to the card; any PNG will do here
        import matplotlib.image

        matplotlib.image.imsave(folder / "pareto.png", torch.rand(8, 8).numpy())
        plots = {"predicted-graph sparsity vs recall": "pareto.png"}
    if kind != "marian":
        tiny_tokenizer().save_pretrained(folder)
    metrics = {"accuracy": 0.5, "steps": 3}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    write_card(model, folder, repo_id=str(folder), metrics=metrics, plots=plots, title=f"tiny {kind}", n=16)


BUILDERS = {
    "pattern": _pattern_models,
    "dam": _dam_models,
    "sparsefinder": _sparsefinder_models,
    "marian": _marian_models,
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """The server, and this process's huggingface_hub online for it even where HF_HUB_OFFLINE=1 guards the suite
    against the real Hub (the in-process checks pass ``endpoint=`` explicitly)."""
    from huggingface_hub import constants

    with HubServer(tmp_path_factory.mktemp("hub")) as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


@pytest.fixture(scope="module")
def round_trip(hub, tmp_path_factory):
    """Build, save, push (one process) and load back (another process) every kind once."""
    tmp = tmp_path_factory.mktemp("round_trip")
    torch.manual_seed(0)
    expected, jobs, folders = {}, {}, {}
    for kind in KINDS:
        first, second = BUILDERS[kind]()
        second = second if second is not None else _changed_copy(first)
        inputs = _inputs(kind)
        with torch.no_grad():
            logits = [model(**inputs).logits for model in (first, second)]
        assert not torch.equal(*logits), f"{kind}: version 2 must compute something else for the revision check"
        folders[kind] = [tmp / kind / "v1", tmp / kind / "v2"]
        for model, folder in zip((first, second), folders[kind]):
            _save(model, folder, kind)
        jobs[kind] = [str(f) for f in folders[kind]]
        expected[kind] = {
            "auto": AUTO[kind],
            "inputs": inputs,
            "logits1": logits[0],
            "logits2": logits[1],
            "state1": first.state_dict(),
            "state2": second.state_dict(),
        }
        if kind != "marian":
            words = "the cat sat on the mat"
            expected[kind].update(words=words, ids=tiny_tokenizer()(words)["input_ids"])
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    torch.save(expected, tmp / "expected.pt")
    run_client(PUSH, [tmp / "jobs.json", tmp / "commits.json"], client_env(hub, tmp / "push_home"), os.getcwd())
    (tmp / "empty").mkdir()
    args = [tmp / "expected.pt", tmp / "commits.json", tmp / "report.json"]
    run_client(LOAD, args, client_env(hub, tmp / "load_home"), tmp / "empty")
    commits = json.loads((tmp / "commits.json").read_text())
    return {"report": json.loads((tmp / "report.json").read_text()), "commits": commits, "folders": folders}


@pytest.mark.parametrize("kind", KINDS)
def test_pushed_model_loads_by_repo_id_without_hf_sparse_bit_identical(round_trip, kind):
    """push_to_hub carries the remote code: state dict and logits on padded inputs equal the original's."""
    assert round_trip["report"][f"{kind}/latest"] is True, round_trip["report"][f"{kind}/latest"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_first_commit_id_loads_the_first_version(round_trip, kind):
    """Version 2 was pushed on top; ``revision=<first commit id>`` still gives version 1, bit for bit."""
    commits = round_trip["commits"][kind]
    assert len({commits["1"], commits["2"]}) == 2
    assert round_trip["report"][f"{kind}/first_commit"] is True, round_trip["report"][f"{kind}/first_commit"]


@pytest.mark.parametrize("kind", KINDS)
def test_push_checkpoint_folder_loads_by_repo_id_without_hf_sparse_bit_identical(round_trip, kind):
    assert round_trip["report"][f"{kind}/push_checkpoint"] is True, round_trip["report"][f"{kind}/push_checkpoint"]


def test_push_checkpoint_to_a_branch_leaves_main_alone(round_trip):
    assert round_trip["report"]["dam/branch"] is True, round_trip["report"]["dam/branch"]
    assert round_trip["report"]["dam/push_checkpoint"] is True  # main: still version 1


@pytest.mark.parametrize("kind", ["pattern", "dam", "sparsefinder"])
def test_the_tokenizer_pushed_with_the_checkpoint_loads_by_repo_id(round_trip, kind):
    assert round_trip["report"][f"{kind}/tokenizer"] is True


@pytest.mark.parametrize("kind", KINDS)
def test_push_checkpoint_uploads_the_whole_folder_and_the_card_names_the_repo(round_trip, hub, kind, tmp_path):
    folder, repo_id = round_trip["folders"][kind][0], f"user/{kind}-card"
    local = check_checkpoint(folder)
    extra = {
        "pattern": {"attention_masks.png", "tokenizer_config.json"},
        "dam": {"attention_masks.png", "tokenizer_config.json"},
        "sparsefinder": {"pareto.png", "tokenizer_config.json"},
        "marian": {"pareto.png"},
    }[kind]
    assert {"config.json", "model.safetensors", "metrics.json", "README.md", *extra} <= set(local)
    assert sorted(HfApi(endpoint=hub.endpoint, token=False).list_repo_files(repo_id)) == local
    for name in local:
        path = hf_hub_download(repo_id, name, endpoint=hub.endpoint, cache_dir=tmp_path, token=False)
        with open(path, "rb") as remote:
            data = remote.read()
        if name == "README.md":
            card = data.decode()
        else:
            assert data == (folder / name).read_bytes(), name
    # the card is the saved one, its loading snippet naming the repo instead of the folder it was written in
    assert f'.from_pretrained("{repo_id}", trust_remote_code=True)' in card and str(folder) not in card
    assert card.replace(repo_id, "<id>") == (folder / "README.md").read_text().replace(str(folder), "<id>")
    data = ModelCard(card).data  # the YAML header the Hub reads
    assert data.library_name == "transformers" and "hf_sparse" in data.tags


def test_a_missing_repo_id_is_the_clients_repository_not_found(round_trip, hub, tmp_path):
    assert round_trip["report"]["missing"] is True, round_trip["report"]["missing"]
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", "config.json", endpoint=hub.endpoint, cache_dir=tmp_path, token=False)


# ---- the server speaks what the clients need (in this process: HfApi and hf_hub_download take the endpoint) -----


def test_server_keeps_every_revision_and_answers_conflicts_and_missing_things_as_the_hub(hub, tmp_path):
    api = HfApi(endpoint=hub.endpoint, token=False)

    def read(name, revision=None):
        path = hf_hub_download("user/proto", name, revision=revision, endpoint=hub.endpoint, cache_dir=tmp_path)
        with open(path) as handle:
            return handle.read()

    assert api.create_repo("user/proto").repo_id == "user/proto"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("user/proto")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("user/proto", exist_ok=True).repo_id == "user/proto"
    first = api.upload_file(path_or_fileobj=b"one", path_in_repo="a.txt", repo_id="user/proto").oid
    api.upload_file(path_or_fileobj=b"x", path_in_repo="sub/deep/b.txt", repo_id="user/proto")
    second = api.upload_file(path_or_fileobj=b"two", path_in_repo="a.txt", repo_id="user/proto").oid
    assert read("a.txt", first) == "one" and read("a.txt") == "two" and api.model_info("user/proto").sha == second
    # a commit built on a head that moved since is refused: 412, nothing written
    with pytest.raises(HfHubHTTPError) as stale:
        api.upload_file(path_or_fileobj=b"three", path_in_repo="a.txt", repo_id="user/proto", parent_commit=first)
    assert stale.value.response.status_code == 412 and api.model_info("user/proto").sha == second
    # branches: a push to one leaves main alone
    api.create_branch("user/proto", branch="dev")
    api.create_branch("user/proto", branch="dev", exist_ok=True)
    on_dev = api.upload_file(path_or_fileobj=b"dev", path_in_repo="a.txt", repo_id="user/proto", revision="dev").oid
    refs = {ref.name: ref.target_commit for ref in api.list_repo_refs("user/proto").branches}
    assert refs == {"main": second, "dev": on_dev} and read("a.txt") == "two" and read("a.txt", "dev") == "dev"
    tree = {(e.path, type(e).__name__) for e in api.list_repo_tree("user/proto", recursive=True)}
    assert tree == {
        ("a.txt", "RepoFile"),
        ("sub", "RepoFolder"),
        ("sub/deep", "RepoFolder"),
        ("sub/deep/b.txt", "RepoFile"),
    }
    assert [e.path for e in api.list_repo_tree("user/proto", path_in_repo="sub")] == ["sub/deep"]
    api.delete_folder("sub", repo_id="user/proto")
    assert api.list_repo_files("user/proto") == ["a.txt"]
    assert read("sub/deep/b.txt", second) == "x"  # still there in the older commit
    with pytest.raises(RevisionNotFoundError):
        api.model_info("user/proto", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        read("nope.txt")
    with pytest.raises(RemoteEntryNotFoundError):
        api.delete_file("nope.txt", repo_id="user/proto")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_files("user/nope")


# ---- push_checkpoint refuses folders that would not load by repo id, before anything is sent -------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "ckpt"
    SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:2"))).save_pretrained(folder)
    return folder


def _broken(saved, tmp_path, change) -> str:
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(saved, folder)
    change(folder)
    return str(folder)


def _without_auto_map(folder):
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]
    (folder / "config.json").write_text(json.dumps(config))


def _stock_bert(folder):
    from transformers import BertConfig, BertModel

    (folder / "config.json").unlink()
    BertModel(BertConfig(**tiny_kwargs())).save_pretrained(folder)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda f: (f / "config.json").unlink(), "is not a saved checkpoint: no config.json"),
        (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON"),
        (_stock_bert, "is not an hf_sparse checkpoint: model_type 'bert'"),
        (_without_auto_map, "config.json has no auto_map: the modeling code would not travel"),
        (lambda f: (f / "patterns.py").unlink(), "lacks patterns.py, which the remote code imports"),
        (lambda f: (f / "model.safetensors").unlink(), "holds no weights"),
        (lambda f: (f / "README.md").write_text("![masks](masks.png)"), "shows masks.png, which is not in"),
    ],
    ids=["no-config", "bad-json", "stock-bert", "no-auto-map", "missing-code", "no-weights", "missing-image"],
)
def test_push_checkpoint_refuses_a_folder_that_would_not_load(saved, tmp_path, change, words):
    folder = _broken(saved, tmp_path, change)
    with pytest.raises(ValueError, match=words):
        push_checkpoint(folder, "user/never", token=False)  # refused before any request: no server here
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        push_checkpoint(tmp_path / "absent", "user/never")


# ---- the command line's --push-to-hub ---------------------------------------------------------------------------

LOGITS = textwrap.dedent(
    """
    import sys
    sys.modules["hf_sparse"] = None  # the repo's own code must serve the model
    sys.path = [p for p in sys.path if p not in ("", ".") and "hf_sparse" not in p]
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    batch = tokenizer(["could not open the file", "no such file"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.save(model(**batch).logits, sys.argv[2])
    """
)


def run_command(argv: list[str], env: dict, cwd) -> str:
    """The installed ``hf-sparse`` command with the server as the Hub; what it printed."""
    import shutil

    command = shutil.which("hf-sparse", path=os.path.dirname(sys.executable))
    done = subprocess.run([command, *argv], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_the_dam_command_pushes_its_checkpoint_and_it_loads_back_by_repo_id(hub, tmp_path):
    env = client_env(hub, tmp_path / "home")
    argv = ["dam", "--steps", "2", "--search-steps", "1", "--max-sentences", "300", "--eval-sentences", "40"]
    argv += ["--max-length", "32", "--batch-size", "4", "--output-dir", str(tmp_path / "out")]
    stdout = run_command([*argv, "--push-to-hub", "--hub-model-id", "user/cli-dam"], env, tmp_path)
    assert f"pushed to {hub.endpoint}/user/cli-dam (commit " in stdout
    folder = tmp_path / "out" / "model"
    assert sorted(HfApi(endpoint=hub.endpoint, token=False).list_repo_files("user/cli-dam")) == check_checkpoint(folder)
    run_client(LOGITS, ["user/cli-dam", tmp_path / "remote.pt"], env, tmp_path)
    run_client(LOGITS, [folder, tmp_path / "local.pt"], env, tmp_path)
    assert torch.equal(torch.load(tmp_path / "remote.pt"), torch.load(tmp_path / "local.pt"))


def test_the_finetune_command_pushes_one_repository_per_run(hub, tmp_path):
    env = client_env(hub, tmp_path / "home")
    argv = ["finetune", "--runs", "dense", "pattern", "--num-labels", "2", "--max-per-label", "16", "--steps", "1"]
    argv += ["--batch-size", "8", "--max-length", "16", "--output-dir", str(tmp_path / "out")]
    stdout = run_command([*argv, "--push-to-hub", "--hub-model-id", "user/ft"], env, tmp_path)
    api = HfApi(endpoint=hub.endpoint, token=False)
    for run in ("dense", "pattern"):
        assert f"pushed {run} to {hub.endpoint}/user/ft-{run} (commit " in stdout
        assert sorted(api.list_repo_files(f"user/ft-{run}")) == check_checkpoint(tmp_path / "out" / run)
