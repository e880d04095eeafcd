"""Sharing and loading as a Transformers user does it: sharded checkpoints, the card's title and snippet after a
push, the card of a model built in Python. Each test pins a bug found by an audit of these flows."""

import json
import shutil

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
