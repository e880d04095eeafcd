"""Sharing and loading as a Transformers user does it: sharded checkpoints, the card's title and snippet after a
push, the card of a model built in Python. Each test pins a bug found by an audit of these flows."""

import json
import shutil
import textwrap

import pytest

from conftest import tiny_kwargs
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM
from hf_sparse.hub import check_checkpoint, push_checkpoint


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A checkpoint saved in several safetensors shards, as ``save_pretrained(max_shard_size=...)`` writes it."""
    folder = tmp_path_factory.mktemp("sharded") / "ckpt"
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:2")))
    model.save_pretrained(folder, safe_serialization=True, max_shard_size="50KB")
    return folder


def _shards(folder) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_a_sharded_checkpoint_is_checked_and_uploaded_whole(sharded):
    shards = _shards(sharded)
    assert len(shards) > 1
    assert {"model.safetensors.index.json", *shards} <= set(check_checkpoint(sharded))


def test_push_checkpoint_refuses_a_sharded_checkpoint_missing_a_shard(sharded, tmp_path):
    """Was accepted (the index alone counted as weights): the upload went through and every from_pretrained of the
    repo then failed on the absent shard."""
    folder = tmp_path / "partial"
    shutil.copytree(sharded, folder)
    lost = _shards(folder)[-1]
    (folder / lost).unlink()
    with pytest.raises(ValueError, match=f"lacks shard\\(s\\) \\['{lost}'\\] that model.safetensors.index.json"):
        push_checkpoint(folder, "user/never", token=False)  # refused before any request: no server here
    (folder / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a weights index"):
        check_checkpoint(folder)


# ---- a pushed card names the repo: snippet, title and model-index name -----------------------------------------

# The card's Python block as a user pastes it, where hf_sparse cannot be imported; then one forward on padding.
PASTED = textwrap.dedent(
    """
    import sys
    sys.modules["hf_sparse"] = None
    sys.path = [p for p in sys.path if p not in ("", ".") and "hf_sparse" not in p]
    exec(open(sys.argv[1]).read())
    import torch
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 8, 3, 0, 0]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids > 0).long()).logits
    assert torch.isfinite(logits).all() and logits.shape[:2] == ids.shape
    """
)


@pytest.fixture
def hub(tmp_path):
    """The test Hub; this process online for it (the suite guards against the real Hub with HF_HUB_OFFLINE=1)."""
    from hub_server import HubServer
    from huggingface_hub import constants

    with HubServer(tmp_path / "hub") as server, pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def test_a_card_written_without_a_title_names_the_repo_once_pushed_and_its_snippet_loads(hub, sharded, tmp_path):
    """``hf-sparse card DIR`` titles the card with DIR; push_checkpoint rewrote only the snippet, so the Hub page
    and its model-index were named after a folder on the pusher's disk."""
    from huggingface_hub import ModelCard, constants, hf_hub_download
    from test_hub import client_env, run_client

    from hf_sparse.cards import write_card

    folder = tmp_path / "runs" / "model"
    shutil.copytree(sharded, folder)
    model = SparseBertForMaskedLM.from_pretrained(folder)
    write_card(model, folder, repo_id=str(folder), metrics={"accuracy": 0.5}, dataset="held-out messages")
    assert ModelCard.load(folder / "README.md").data.model_name == str(folder)
    with pytest.MonkeyPatch.context() as patch:  # push_checkpoint's HfApi reads the endpoint when it is built
        patch.setattr(constants, "ENDPOINT", hub.endpoint)
        push_checkpoint(folder, "user/titled", token=False)
    card = ModelCard.load(hf_hub_download("user/titled", "README.md", endpoint=hub.endpoint, cache_dir=tmp_path))
    assert str(folder) not in card.content
    assert card.data.model_name == "user/titled" and card.data.eval_results[0].metric_value == 0.5
    assert card.text.lstrip().startswith("# user/titled\n")
    assert card.data.to_dict()["model-index"][0]["name"] == "user/titled"
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "snippet.py").write_text(code)
    (tmp_path / "empty").mkdir()
    run_client(PASTED, [tmp_path / "snippet.py"], client_env(hub, tmp_path / "home"), tmp_path / "empty")


def test_a_titled_card_keeps_its_title_when_pushed():
    from hf_sparse.cards import model_card
    from hf_sparse.hub import card_for_repo

    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:2")))
    text = str(model_card(model, repo_id="runs/x", title="My sparse model"))
    pushed = card_for_repo(text, "me/sparse")
    assert pushed == text.replace('from_pretrained("runs/x"', 'from_pretrained("me/sparse"')
    assert "runs/x" not in pushed and "# My sparse model" in pushed


def test_model_card_of_a_dam_model_built_in_python_describes_the_length_its_gates_cover():
    """``model_card(model)`` (no ``n``) described length min(512, positions) and the DAM gates refused it; only
    ``write_card`` capped ``n`` at dam ``max_length``."""
    from hf_sparse.cards import model_card

    dam = {"structure": "offset", "max_length": 24}
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(dam=dam, max_position_embeddings=64)))
    model.freeze_dam()
    text = model_card(model, repo_id="me/dam").text
    masks = model.bert.dam.frozen(24)  # one mask for every layer (shared gates)
    for layer in range(2):
        assert f"| {layer} | `learned` | {100 * (1 - masks[layer % len(masks)].float().mean().item()):.1f} % |" in text


def test_pushing_shards_over_a_single_weights_file_deletes_the_stale_one(hub, sharded, tmp_path):
    """The earlier ``model.safetensors`` stayed next to the new index and shards, and Transformers loads it first:
    the repo served the old weights. Weights the folder replaces go in the same commit; other files stay."""
    from huggingface_hub import HfApi, constants

    single = tmp_path / "single"
    SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="window:2"))).save_pretrained(single)
    api = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.MonkeyPatch.context() as patch:  # push_checkpoint's HfApi reads the endpoint when it is built
        patch.setattr(constants, "ENDPOINT", hub.endpoint)
        push_checkpoint(single, "user/reshard", token=False)
        api.upload_file(path_or_fileobj=b"mine", path_in_repo="notes.txt", repo_id="user/reshard")
        push_checkpoint(sharded, "user/reshard", token=False)
        assert sorted(api.list_repo_files("user/reshard")) == sorted([*check_checkpoint(sharded), "notes.txt"])
        push_checkpoint(single, "user/reshard", revision="single", token=False)  # and back, on a branch
        assert sorted(api.list_repo_files("user/reshard", revision="single")) == sorted(
            [*check_checkpoint(single), "notes.txt"]
        )
    assert "model.safetensors.index.json" in api.list_repo_files("user/reshard")  # main untouched
