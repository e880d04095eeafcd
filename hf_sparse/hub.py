"""Push a saved hf_sparse checkpoint folder to the Hugging Face Hub as one commit.

A saved folder (``save_pretrained`` + tokenizer + ``metrics.json`` + the model card ``README.md`` and its images, as
the CLI writes it) loads elsewhere only if its modeling code travels with it: ``config.json``'s ``auto_map`` names
the copied ``.py`` files that ``from_pretrained(repo_id, trust_remote_code=True)`` imports. So the folder is checked
first, and a folder that would not load (no ``auto_map``, a missing code file or image) is refused before anything
is sent. The card's loading snippet, and a title that named the local folder, are rewritten to name the repo id
(the CLI writes the local folder there).
Training/CLI side: not imported by modeling code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, ModelCard

from .configuration_entmax_marian import EntmaxSparsefinderMarianConfig
from .configuration_sparse_bert import SparseBertConfig

# a file a weights loader reads: one safetensors file, a sharded index, or a PyTorch pickle
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# every file of a saved model's weights: one of WEIGHTS or a shard (model-00001-of-00002.safetensors)
_WEIGHTS_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)
_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
_SNIPPET = re.compile(r'(\.from_pretrained\()"([^"]*)"(, trust_remote_code=True\))')


def check_checkpoint(directory: str | os.PathLike) -> list[str]:
    """Refuse a folder that would not load by repo id with ``trust_remote_code=True``; return the files to upload.

    Checked: ``config.json`` of an hf_sparse model with an ``auto_map``; every module ``auto_map`` names and every
    module they import relatively (``from .x import y``) present as ``.py``; weights (with every shard a sharded
    index names); the images the card shows.
    Files and folders whose name starts with ``.`` (caches, ``.git``) are not uploaded.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such checkpoint folder")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{root} is not a saved checkpoint: no config.json (write one with model.save_pretrained)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path} is not valid JSON ({error}); save the model again") from None
    ours = (SparseBertConfig.model_type, EntmaxSparsefinderMarianConfig.model_type)
    if config.get("model_type") not in ours:
        raise ValueError(
            f"{root} is not an hf_sparse checkpoint: model_type {config.get('model_type')!r}, expected one of {ours}"
        )
    if not config.get("auto_map"):
        raise ValueError(
            f"{root}/config.json has no auto_map: the modeling code would not travel with the checkpoint, so "
            "from_pretrained(repo_id, trust_remote_code=True) could not load it; save it again with "
            "model.save_pretrained() from an hf_sparse model (it writes auto_map and copies the code)"
        )
    pending = {reference.split(".")[0] for reference in config["auto_map"].values()}
    seen: set[str] = set()
    while pending:  # the auto_map modules and, transitively, the siblings they import
        module = pending.pop()
        seen.add(module)
        source = root / f"{module}.py"
        if not source.is_file():
            raise ValueError(f"{root} lacks {source.name}, which the remote code imports; save the model again")
        pending |= set(_RELATIVE_IMPORT.findall(source.read_text())) - seen
    if not any((root / name).is_file() for name in WEIGHTS):
        raise ValueError(f"{root} holds no weights (one of {', '.join(WEIGHTS)})")
    for index in (root / name for name in WEIGHTS if name.endswith(".index.json")):
        _check_shards(index)
    card = root / "README.md"
    if card.is_file():
        for image in _IMAGE.findall(card.read_text()):
            if "://" not in image and not (root / image).is_file():
                raise ValueError(f"{card} shows {image}, which is not in {root}")
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def _check_shards(index: Path) -> None:
    """A sharded checkpoint (``save_pretrained(max_shard_size=...)``) loads only with every shard its index names:
    one left behind (a partial copy) would upload fine and then fail every ``from_pretrained``."""
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ValueError(
            f"{index} is not a weights index (JSON with a 'weight_map' of tensor name -> shard file); save the model "
            "again"
        ) from None
    absent = [shard for shard in shards if not (index.parent / shard).is_file()]
    if absent:
        raise ValueError(f"{index.parent} lacks shard(s) {absent} that {index.name} names; save the model again")


def card_for_repo(text: str, repo_id: str) -> str:
    """The saved card as the repo shows it: its loading snippet names ``repo_id`` instead of the folder it was
    written in, and so do its title and the metadata's ``model_name`` (the model-index name) where they were that
    folder (a card written without a title, e.g. ``hf-sparse card DIR``). Other text is left as written."""
    snippet = _SNIPPET.search(text)
    if snippet is None or snippet[2] == repo_id:
        return text
    local = snippet[2]
    text = _SNIPPET.sub(lambda m: f'{m[1]}"{repo_id}"{m[3]}', text)
    card = ModelCard(text) if text.startswith("---") else None
    if card is None or card.data.model_name != local:  # titled by the user: kept
        return text
    card.data.model_name = repo_id
    card.text = re.sub(rf"^# {re.escape(local)}$", lambda _: f"# {repo_id}", card.text, count=1, flags=re.MULTILINE)
    return card.content


def push_checkpoint(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    commit_message: str = "Upload hf_sparse checkpoint",
    private: bool = False,
    token: str | bool | None = None,
) -> CommitInfo:
    """Upload a saved checkpoint folder to ``repo_id`` as one commit; returns the ``CommitInfo`` (``.oid`` is the
    commit id to pin with ``from_pretrained(repo_id, revision=...)``, ``.commit_url`` where to see it).

    The repo is created if missing (``private`` applies then only), as is the branch ``revision`` (from ``main``).
    Files not in the folder stay in the repo, except weights of an earlier push that this folder's weights
    replace (a single ``model.safetensors`` replaced by shards, shards by fewer shards, ``.bin`` by safetensors):
    they are deleted in the same commit, as Transformers would load a stale ``model.safetensors`` before the new
    index. The Hub is ``HF_ENDPOINT`` (default huggingface.co); ``token`` defaults to the saved login.

    Example (after ``hf auth login``)::

        commit = push_checkpoint("runs/dam/model", "me/sparsebert-dam")
        print(commit.commit_url)  # later: from_pretrained("me/sparsebert-dam", revision=commit.oid, ...)
    """
    root = Path(directory)
    files = check_checkpoint(root)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = []
    for name in files:
        content: str | bytes = str(root / name)
        if name == "README.md":  # the loading snippet names the repo, not the folder it was written in
            content = card_for_repo((root / name).read_text(), repo_id).encode()
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content))
    stale = [name for name in api.list_repo_files(repo_id, revision=revision) if _WEIGHTS_FILE.match(name)]
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale if name not in files]
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
