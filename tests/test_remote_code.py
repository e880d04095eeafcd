"""Checkpoints carry their code: they load where hf_sparse cannot be imported at all."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from conftest import random_batch, tiny_kwargs
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM

# Runs in a fresh interpreter in which `import hf_sparse` fails, from an empty working directory.
# argv: auto class name, a torch file with the forward inputs, the checkpoint, the output file.
CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["hf_sparse"] = None  # any import of hf_sparse now raises ImportError
    sys.path = [p for p in sys.path if p not in ("", ".") and "hf_sparse" not in p]
    import torch
    import transformers
    try:
        import hf_sparse  # noqa: F401
        raise SystemExit("hf_sparse is importable in the child")
    except ImportError:
        pass
    auto, inputs, where, out = sys.argv[1], torch.load(sys.argv[2]), sys.argv[3], sys.argv[4]
    model = getattr(transformers, auto).from_pretrained(where, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    result = {"class": type(model).__name__, "config": model.config.to_dict()}
    with torch.no_grad():
        output = model(**{k: v for k, v in inputs.items() if k != "probe"})
    result["logits"] = output.logits if "logits" in output else output.last_hidden_state  # a base model: features
    dam = getattr(model.base_model, "dam", None)
    if dam is not None:
        result["mask"] = dam.frozen(inputs["input_ids"].shape[1])
    probe = inputs.pop("probe", None)  # (q, k): predicted pairs of every Sparsefinder predictor on them
    if probe is not None:
        module = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".sparsefinder"]  # the copied sibling
        result["pairs"] = {
            layer: module.predict_pairs(attn.sparsefinder, *probe, model.config.sparsefinder, None, causal=True)
            for layer, attn in model.sparsefinder_modules().items()
        }
    if model.config.is_encoder_decoder and model.can_generate():
        result["generated"] = model.generate(
            inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6, num_beams=2
        )
    torch.save(result, out)
    """
)


def run_without_hf_sparse(tmp_path, auto: str, inputs: dict, where: str, env_extra: dict | None = None) -> dict:
    """Load ``where`` with ``transformers.<auto>.from_pretrained(trust_remote_code=True)`` in a child process that
    cannot import hf_sparse, run ``inputs`` through it, and return what it computed."""
    torch.save(inputs, tmp_path / "inputs.pt")
    workdir = tmp_path / "empty"
    workdir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"), **(env_extra or {}))
    args = [auto, str(tmp_path / "inputs.pt"), where, str(tmp_path / "out.pt")]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def _run_child(tmp_path, where: str, env_extra: dict) -> dict:
    ids, mask = random_batch()
    return run_without_hf_sparse(
        tmp_path, "AutoModelForMaskedLM", {"input_ids": ids, "attention_mask": mask}, where, env_extra
    )


def _trained_tiny_model(**config) -> SparseBertForMaskedLM:
    """A few optimizer steps so the weights are not the initialisation."""
    config = {"attention_pattern": "window:2+global:1", **config}
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(**config)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, mask = random_batch()
    for _ in range(3):
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _local_logits(model):
    ids, mask = random_batch()
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def test_saved_checkpoint_writes_auto_map_and_copies_its_code(tmp_path):
    _trained_tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "sparse_bert"
    assert config["auto_map"]["AutoConfig"] == "configuration_sparse_bert.SparseBertConfig"
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_sparse_bert.SparseBertForMaskedLM"
    copied = {p.name for p in tmp_path.glob("*.py")}
    assert {"configuration_sparse_bert.py", "modeling_sparse_bert.py", "patterns.py", "attention.py"} <= copied


def test_remote_code_from_a_local_directory_without_hf_sparse_gives_identical_logits(tmp_path):
    model = _trained_tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    got = _run_child(tmp_path, str(tmp_path / "ckpt"), {})
    assert got["class"] == "SparseBertForMaskedLM" and got["config"]["attention_pattern"] == "window:2+global:1"
    assert torch.equal(got["logits"], _local_logits(model))


def test_remote_code_from_an_offline_hub_cache_layout(tmp_path):
    """The files laid out as huggingface_hub caches a download of repo 'org/name', read with HF_HUB_OFFLINE=1."""
    model = _trained_tiny_model()
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache = tmp_path / "hub"
    repo = hub_cache / "models--org--name"
    snapshot = repo / "snapshots" / commit
    model.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    got = _run_child(tmp_path, "org/name", {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)})
    assert torch.equal(got["logits"], _local_logits(model))


def test_frozen_dam_checkpoint_loads_without_hf_sparse_with_the_same_mask_and_logits(tmp_path):
    dam = {"structure": "element", "share_across_layers": False, "max_length": 32, "init_noise": 1.0}
    model = _trained_tiny_model(attention_pattern="window:6", dam=dam)
    assert model.freeze_dam() == "window:6&learned"
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "dam.py").exists()
    got = _run_child(tmp_path, str(tmp_path / "ckpt"), {})
    assert got["config"]["attention_pattern"] == "window:6&learned"
    assert torch.equal(got["mask"], model.bert.dam.frozen(20))
    assert torch.equal(got["logits"], _local_logits(model))


def test_entmax_marian_loads_without_hf_sparse_with_identical_logits_and_generations(tmp_path):
    from hf_sparse import EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianMTModel
    from test_modeling_entmax_marian import MARIAN, batch

    torch.manual_seed(0)
    model = EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN, entmax_alpha=1.5)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.mul_(6.0)  # sparse entmax rows
    model.save_pretrained(tmp_path / "ckpt")
    ids, mask, decoder = batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}
    got = run_without_hf_sparse(tmp_path, "AutoModelForSeq2SeqLM", inputs, str(tmp_path / "ckpt"))
    assert got["class"] == "EntmaxSparsefinderMarianMTModel"
    assert got["config"]["decoder_attention_fn"] == "entmax15"
    with torch.no_grad():
        assert torch.equal(got["logits"], model(**inputs).logits)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2)
    assert torch.equal(got["generated"], want)


def test_fitted_sparsefinder_marian_predicts_and_generates_identically_without_hf_sparse(tmp_path):
    from test_sparsefinder_marian import loader, model_with

    from hf_sparse.sparsefinder import fit, predict_pairs

    model = model_with(threshold=0.7)
    fit(model, loader(), epochs=3, progress=False)
    model.config.sparsefinder["enabled"] = True
    model.save_pretrained(tmp_path / "ckpt")
    inputs = loader(1)[0]
    g = torch.Generator().manual_seed(3)
    probe = (torch.randn(2, 4, 10, 8, generator=g), torch.randn(2, 4, 10, 8, generator=g))
    got = run_without_hf_sparse(tmp_path, "AutoModelForSeq2SeqLM", {**inputs, "probe": probe}, str(tmp_path / "ckpt"))
    assert got["config"]["sparsefinder"]["enabled"] is True
    for layer, attn in model.sparsefinder_modules().items():
        want = predict_pairs(attn.sparsefinder, *probe, model.config.sparsefinder, None, causal=True)
        assert torch.equal(got["pairs"][layer], want)
        assert not want.all()  # a real prediction, not everything
    with torch.no_grad():
        assert torch.equal(got["logits"], model(**inputs).logits)
    want = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=6, num_beams=2)
    assert torch.equal(got["generated"], want)


def test_a_checkpoint_of_one_head_loads_as_every_other_head_without_hf_sparse(tmp_path):
    """Fine-tuning a classifier from a (DAM-)pretrained masked-LM checkpoint, or taking features from it, is the
    usual next step: stock BERT allows it, so the saved auto_map names every head, not only the saved one."""
    from hf_sparse import EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianMTModel
    from test_modeling_entmax_marian import MARIAN, batch

    model = _trained_tiny_model()
    model.save_pretrained(tmp_path / "mlm")
    ids, mask = random_batch()
    inputs = {"input_ids": ids, "attention_mask": mask}
    got = run_without_hf_sparse(tmp_path, "AutoModel", inputs, str(tmp_path / "mlm"))
    assert got["class"] == "SparseBertModel"
    with torch.no_grad():
        assert torch.equal(got["logits"], model.bert(ids, attention_mask=mask).last_hidden_state)
    for auto, head in [
        ("AutoModelForSequenceClassification", "SparseBertForSequenceClassification"),
        ("AutoModelForTokenClassification", "SparseBertForTokenClassification"),
    ]:
        got = run_without_hf_sparse(tmp_path, auto, inputs, str(tmp_path / "mlm"))
        assert got["class"] == head and got["config"]["attention_pattern"] == "window:2+global:1"

    torch.manual_seed(0)
    marian = EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN)).eval()
    marian.save_pretrained(tmp_path / "mt")
    ids, mask, decoder = batch()
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": decoder}
    got = run_without_hf_sparse(tmp_path, "AutoModel", inputs, str(tmp_path / "mt"))
    assert got["class"] == "EntmaxSparsefinderMarianModel"
    with torch.no_grad():
        assert torch.equal(got["logits"], marian.model(**inputs).last_hidden_state)


def test_remote_code_imports_only_torch_transformers_and_the_standard_library(tmp_path):
    """Loading by repo id, Transformers reads every import statement of every copied module (inside functions
    too, not under ``try``) and refuses the checkpoint if one names a package that is not installed: a bare
    ``import triton.language`` in a helper made every checkpoint unloadable from the Hub where triton is missing
    (CPU-only machines, macOS, Windows). A local folder skips that check, so it is asserted here directly."""
    from transformers.dynamic_module_utils import get_imports

    from hf_sparse import EntmaxSparsefinderMarianConfig, EntmaxSparsefinderMarianMTModel
    from test_modeling_entmax_marian import MARIAN

    SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs())).save_pretrained(tmp_path / "bert")
    EntmaxSparsefinderMarianMTModel(EntmaxSparsefinderMarianConfig(**MARIAN)).save_pretrained(tmp_path / "marian")
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "huggingface_hub", "safetensors"}
    files = sorted(tmp_path.glob("*/*.py"))
    assert {f.name for f in files} >= {
        "modeling_sparse_bert.py", "entmax_triton.py", "entmax_rows_triton.py", "pair_codes.py",
        "modeling_entmax_marian.py",
    }
    needed = {f"{f.parent.name}/{f.name}": sorted(set(get_imports(f)) - allowed) for f in files}
    assert not any(needed.values()), needed
