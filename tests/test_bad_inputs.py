"""What bad input gets: one row per case, each naming the exception and a fragment of its message, or the
documented result. Config values, pattern specs, tensors, checkpoints, callbacks, functions and CLI arguments."""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import BertForMaskedLM, MarianConfig, MarianMTModel

from conftest import random_batch, tiny_bert_config, tiny_kwargs
from hf_sparse import (
    EntmaxSparsefinderMarianConfig,
    EntmaxSparsefinderMarianMTModel,
    SparseBertConfig,
    SparseBertForMaskedLM,
    SparseBertModel,
    cli,
)
from hf_sparse.callbacks import DAMCallback
from hf_sparse.entmax_topk import entmax15, entmax_alpha
from test_modeling_entmax_marian import MARIAN


@dataclass
class Row:
    name: str
    action: Callable[[Any], Any]  # gets pytest's tmp_path
    error: type[BaseException] | None  # None: a documented result, checked by ``result``
    fragment: str = ""
    result: Callable[[Any], bool] | None = None


def bert(**overrides):
    return SparseBertConfig(**tiny_kwargs(**overrides))


def bert_model(**overrides):
    return SparseBertModel(bert(**overrides)).eval()


def marian(**overrides):
    return EntmaxSparsefinderMarianConfig(**{**MARIAN, **overrides})


def ids(b=2, n=20):
    return random_batch()[0][:b, :n]


def predicted_marian_attentions():
    from test_modeling_entmax_marian import batch

    model = EntmaxSparsefinderMarianMTModel(marian(sparsefinder={"method": "window", "window": 2, "enabled": True}))
    ids, mask, decoder = batch()
    return model.eval()(
        input_ids=ids, attention_mask=mask, decoder_input_ids=decoder, output_attentions=True
    ).decoder_attentions


def _with_config(model, **fields):
    for name, value in fields.items():
        setattr(model.config, name, value)
    return model


def saved_frozen_dam(tmp, edit):
    model = SparseBertForMaskedLM(bert(dam={"structure": "offset", "max_length": 32, "init_noise": 1.0}))
    model.freeze_dam()
    model.save_pretrained(tmp)
    edit(tmp)
    return SparseBertForMaskedLM.from_pretrained(tmp)


def saved_predictors(tmp, edit, enabled=False):
    settings = {"method": "distance", "enabled": enabled}
    model = SparseBertForMaskedLM(bert(attention_fn="entmax15", sparsefinder=settings))
    for module in model.sparsefinder_modules().values():
        module.sparsefinder.fitted.fill_(True)
    model.save_pretrained(tmp)
    edit(tmp)
    return SparseBertForMaskedLM.from_pretrained(tmp)


def drop_keys(*fragments):
    def edit(tmp):
        state = load_file(tmp / "model.safetensors")
        for key in [k for k in state if any(f in k for f in fragments)]:
            del state[key]
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})

    return edit


def add_key(name):
    def edit(tmp):
        state = load_file(tmp / "model.safetensors")
        state[name] = torch.zeros(2)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})

    return edit


def edit_config(**fields):
    def edit(tmp):
        config = json.loads((tmp / "config.json").read_text())
        config.update(fields)
        (tmp / "config.json").write_text(json.dumps(config))

    return edit


def truncate(tmp):
    data = (tmp / "model.safetensors").read_bytes()
    (tmp / "model.safetensors").write_bytes(data[: len(data) // 2])


def stock_bert(tmp, **fields):
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp)
    edit_config(**fields)(tmp)
    return SparseBertForMaskedLM.from_pretrained(tmp)


ROWS = [
    # -- SparseBertConfig ---------------------------------------------------------------------------------------
    Row("unknown pattern", lambda t: bert(attention_pattern="windw:3"), ValueError, "unknown pattern 'windw'"),
    Row("pattern argument not a number", lambda t: bert(attention_pattern="window:x"), ValueError, "non-integer"),
    Row("pattern argument huge", lambda t: bert(attention_pattern="window:9999999999"), ValueError, "up to 2147483647"),
    Row("pattern C > L", lambda t: bert(attention_pattern="fixed:4,9"), ValueError, "C must be at most L=4"),
    Row("pattern empty", lambda t: bert(attention_pattern=""), ValueError, "non-empty"),
    Row("learned without DAM", lambda t: bert(attention_pattern="learned"), ValueError, "needs a frozen DAM mask"),
    Row("unknown attention_fn", lambda t: bert(attention_fn="entmax"), ValueError, "unknown attention_fn 'entmax'"),
    Row("unknown backend", lambda t: bert(attention_backend="fast"), ValueError, "unknown attention_backend 'fast'"),
    Row("entmax_alpha as text", lambda t: bert(entmax_alpha="2"), ValueError, "entmax_alpha must be a finite number"),
    Row(
        "entmax_alpha 1 with bisect",
        lambda t: bert(attention_fn="entmax_bisect", entmax_alpha=1.0),
        ValueError,
        "entmax_alpha must be a finite number >= 1.001 and <= 3",
    ),
    Row(
        "entmax_alpha 1e9 with bisect",
        lambda t: bert(attention_fn="entmax_bisect", entmax_alpha=1e9),
        ValueError,
        "<= 3",
    ),
    Row(
        "entmax_alpha inf",
        lambda t: bert(attention_fn="entmax_bisect", entmax_alpha=math.inf),
        ValueError,
        "entmax_alpha must be a finite number",
    ),
    Row("entmax_alpha NaN", lambda t: bert(entmax_alpha=math.nan), ValueError, "got nan"),
    # -- DAM settings ------------------------------------------------------------------------------------------
    Row("dam as a string", lambda t: bert(dam="offset"), ValueError, "dam must be a dict of settings"),
    Row("dam unknown key", lambda t: bert(dam={"struct": "offset"}), ValueError, "unknown dam setting(s) ['struct']"),
    Row("dam structure", lambda t: bert(dam={"structure": "diag"}), ValueError, "unknown dam structure 'diag'"),
    Row("dam penalty NaN", lambda t: bert(dam={"penalty": math.nan}), ValueError, "dam penalty must be a finite"),
    Row("dam penalty text", lambda t: bert(dam={"penalty": "big"}), ValueError, "dam penalty must be a finite"),
    Row("dam penalty negative", lambda t: bert(dam={"penalty": -1.0}), ValueError, "dam penalty must be"),
    Row("dam mask_value inf", lambda t: bert(dam={"mask_value": math.inf}), ValueError, "dam mask_value must be"),
    Row("dam mask_value negative", lambda t: bert(dam={"mask_value": -5.0}), ValueError, "> 0"),
    Row("dam temperature 0", lambda t: bert(dam={"temperature": 0}), ValueError, "dam temperature must be"),
    Row("dam hard 'no'", lambda t: bert(dam={"hard": "no"}), ValueError, "dam hard must be true or false"),
    Row("dam frozen 'yes'", lambda t: bert(dam={"frozen": "yes"}), ValueError, "dam frozen must be true or false"),
    Row("dam block_size 1.5", lambda t: bert(dam={"block_size": 1.5}), ValueError, "dam block_size must be a whole"),
    Row("dam max_length too long", lambda t: bert(dam={"max_length": 1000}), ValueError, "dam max_length=1000"),
    Row("dam hard False", lambda t: bert(dam={"hard": False}), ValueError, "hard=False (a soft mask)"),
    # -- Sparsefinder settings ---------------------------------------------------------------------------------
    Row(
        "sparsefinder as a string",
        lambda t: bert(attention_fn="entmax15", sparsefinder="distance"),
        ValueError,
        "sparsefinder must be a dict of settings",
    ),
    Row(
        "sparsefinder method",
        lambda t: bert(attention_fn="entmax15", sparsefinder={"method": "knn"}),
        ValueError,
        "unknown sparsefinder method 'knn'",
    ),
    Row(
        "sparsefinder threshold negative",
        lambda t: bert(attention_fn="entmax15", sparsefinder={"threshold": -1}),
        ValueError,
        "threshold must be a number >= 0",
    ),
    Row(
        "sparsefinder enabled 'yes'",
        lambda t: bert(attention_fn="entmax15", sparsefinder={"enabled": "yes"}),
        ValueError,
        "enabled must be true or false",
    ),
    Row(
        "sparsefinder layer missing",
        lambda t: bert(attention_fn="entmax15", sparsefinder={"layers": [9]}),
        ValueError,
        "layers [9] do not exist",
    ),
    Row(
        "sparsefinder with softmax",
        lambda t: bert(sparsefinder={"method": "distance"}),
        ValueError,
        "nothing to predict",
    ),
    # -- Marian ------------------------------------------------------------------------------------------------
    Row("marian normaliser", lambda t: marian(decoder_attention_fn="sofmax"), ValueError, "decoder_attention_fn"),
    Row(
        "marian set_attn_implementation sdpa",
        lambda t: EntmaxSparsefinderMarianMTModel(marian()).set_attn_implementation("sdpa"),
        ValueError,
        "would run softmax instead",
    ),
    Row(
        "sparsebert set_attn_implementation sdpa",
        lambda t: bert_model().set_attn_implementation("sdpa"),
        ValueError,
        "give attention_backend='sdpa' instead",
    ),
    # -- tensors -----------------------------------------------------------------------------------------------
    Row(
        "attention_mask 3-D",
        lambda t: bert_model(attention_pattern="window:2")(ids(), attention_mask=torch.ones(2, 20, 20)),
        ValueError,
        "attention_mask must have shape (batch, sequence)",
    ),
    Row(
        "attention_mask wrong length",
        lambda t: bert_model()(ids(), attention_mask=torch.ones(2, 19)),
        ValueError,
        "attention_mask covers 19 positions but the input has 20",
    ),
    Row(
        "attention_mask one row for two",
        lambda t: bert_model()(ids(), attention_mask=torch.ones(1, 20)),
        ValueError,
        "attention_mask has 1 rows but the batch has 2",
    ),
    Row(
        "sequence longer than positions",
        lambda t: bert_model()(torch.ones(1, 100, dtype=torch.long)),
        ValueError,
        "longer than max_position_embeddings=64",
    ),
    Row("empty batch", lambda t: bert_model()(torch.ones(0, 5, dtype=torch.long)), ValueError, "shape (0, 5)"),
    Row("pattern keeping nothing: global:0", lambda t: bert(attention_pattern="global:0"), ValueError, "keeps no pair"),
    Row("pattern keeping nothing: random:0", lambda t: bert(attention_pattern="random:0"), ValueError, "keeps no pair"),
    Row(
        "pattern keeping nothing: an empty intersection",
        lambda t: bert(attention_pattern="no_diagonal&window:0"),
        ValueError,
        "'no_diagonal&window:0' keeps no pair",
    ),
    Row(
        "global:0 inside a union (documented: the union's other parts)",
        lambda t: bert(attention_pattern="longformer:2,0"),
        None,
        result=lambda config: config.attention_pattern == "longformer:2,0",
    ),
    Row(
        "marian length 0",
        lambda t: EntmaxSparsefinderMarianMTModel(marian()).eval()(
            input_ids=torch.ones(1, 0, dtype=torch.long), decoder_input_ids=torch.zeros(1, 1, dtype=torch.long)
        ),
        ValueError,
        "input_ids has shape (1, 0)",
    ),
    Row(
        "marian decoder length 0",
        lambda t: EntmaxSparsefinderMarianMTModel(marian()).eval()(
            input_ids=torch.ones(1, 4, dtype=torch.long), decoder_input_ids=torch.zeros(1, 0, dtype=torch.long)
        ),
        ValueError,
        "decoder_input_ids has shape (1, 0)",
    ),
    Row(
        "marian attention_mask one row for three",
        lambda t: EntmaxSparsefinderMarianMTModel(marian()).eval()(
            input_ids=torch.ones(3, 7, dtype=torch.long),
            attention_mask=torch.tensor([[1] * 5 + [0] * 2]),
            decoder_input_ids=torch.zeros(3, 1, dtype=torch.long),
        ),
        ValueError,
        "attention_mask has 1 rows but the batch has 3",
    ),
    Row(
        "marian attention_mask wrong length",
        lambda t: EntmaxSparsefinderMarianMTModel(marian()).eval()(
            input_ids=torch.ones(2, 7, dtype=torch.long),
            attention_mask=torch.ones(2, 6, dtype=torch.long),
            decoder_input_ids=torch.zeros(2, 1, dtype=torch.long),
        ),
        ValueError,
        "attention_mask covers 6 positions but the input has 7",
    ),
    Row("length 0", lambda t: bert_model()(torch.ones(2, 0, dtype=torch.long)), ValueError, "shape (2, 0)"),
    Row(
        "length 1 (documented: runs)",
        lambda t: bert_model(attention_pattern="window:2")(torch.ones(2, 1, dtype=torch.long)).last_hidden_state,
        None,
        result=lambda out: out.shape == (2, 1, 32) and bool(torch.isfinite(out).all()),
    ),
    Row(
        "random:3 on one-token rows (documented: the row's only token)",
        lambda t: bert_model(attention_pattern="random:3", attention_backend="eager")(
            torch.ones(2, 1, dtype=torch.long), attention_mask=torch.ones(2, 1), output_attentions=True
        ).attentions[0],
        None,
        result=lambda probs: bool((probs == 1).all()),
    ),
    Row(
        "all padding (documented: finite outputs)",
        lambda t: bert_model(attention_pattern="window:2")(ids(), attention_mask=torch.zeros(2, 20)).last_hidden_state,
        None,
        result=lambda out: bool(torch.isfinite(out).all()),
    ),
    Row(
        "entmax15 dim out of range",
        lambda t: entmax15(torch.randn(2, 3), dim=5),
        ValueError,
        "dim=5 is out of range for scores with 2 dimensions",
    ),
    Row("entmax alpha inf", lambda t: entmax_alpha(torch.randn(2, 3), math.inf), ValueError, "alpha must be > 1"),
    Row("entmax alpha 1e9", lambda t: entmax_alpha(torch.randn(2, 3), 1e9), ValueError, "<= 1e+06"),
    Row(
        "Marian predicted decoding with output_attentions (documented: the probabilities, scattered)",
        lambda t: predicted_marian_attentions(),
        None,
        result=lambda attentions: len(attentions) == 2 and all(a.shape[-2:] == (9, 9) for a in attentions),
    ),
    Row("entmax n_iter 0", lambda t: entmax_alpha(torch.randn(2, 3), 1.3, n_iter=0), ValueError, "n_iter must be"),
    Row(
        "entmax keep not bool",
        lambda t: entmax15(torch.randn(2, 3), keep=torch.ones(2, 3)),
        TypeError,
        "keep must be a bool tensor",
    ),
    Row(
        "entmax NaN score (documented: that row is NaN, as torch.softmax)",
        lambda t: entmax15(torch.tensor([[math.nan, 1.0, 2.0], [0.0, 1.0, 2.0]])),
        None,
        result=lambda p: bool(torch.isnan(p[0]).all()) and torch.allclose(p[1].sum(), torch.tensor(1.0)),
    ),
    # -- checkpoints -------------------------------------------------------------------------------------------
    Row(
        "frozen DAM mask deleted",
        lambda t: saved_frozen_dam(t, drop_keys("dam.frozen_mask")),
        ValueError,
        "lack ['bert.dam.frozen_mask']",
    ),
    Row(
        "predictor weight deleted",
        lambda t: saved_predictors(t, drop_keys("layer.0.attention.self.sparsefinder.q_weight")),
        ValueError,
        "lacks predictor state ['bert.encoder.layer.0.attention.self.sparsefinder.q_weight']",
    ),
    Row(
        "enabled predictors all missing",
        lambda t: saved_predictors(t, drop_keys(".sparsefinder."), enabled=True),
        ValueError,
        "sparsefinder.enabled is set",
    ),
    Row(
        "unexpected predictor state",
        lambda t: saved_predictors(t, add_key("bert.encoder.layer.0.attention.self.sparsefinder.centroids")),
        ValueError,
        "Sparsefinder state this model's config has no place for",
    ),
    Row(
        "predictors missing, not enabled (documented: fresh, unfitted)",
        lambda t: saved_predictors(t, drop_keys(".sparsefinder.")),
        None,
        result=lambda m: not any(x.sparsefinder.is_fitted() for x in m.sparsefinder_modules().values()),
    ),
    Row(
        "truncated weights (safetensors' error)",
        lambda t: saved_frozen_dam(t, truncate),
        SafetensorError,
        "incomplete metadata, file not fully covered",
    ),
    Row(
        "hand-edited config: pattern out of range",
        lambda t: stock_bert(t, attention_pattern="window:99999999999"),
        ValueError,
        "up to 2147483647",
    ),
    Row(
        "hand-edited config: dam penalty text",
        lambda t: stock_bert(t, dam={"penalty": "big"}),
        ValueError,
        "dam penalty must be a finite number",
    ),
    Row(
        "stock Marian into SparseBERT",
        lambda t: (
            MarianMTModel(MarianConfig(**MARIAN)).save_pretrained(t),
            SparseBertForMaskedLM.from_pretrained(t),
        ),
        ValueError,
        "this config is of model_type 'marian': SparseBERT loads BERT checkpoints",
    ),
    Row(
        "stock BERT into the entmax Marian",
        lambda t: (
            BertForMaskedLM(tiny_bert_config()).save_pretrained(t),
            EntmaxSparsefinderMarianMTModel.from_pretrained(t),
        ),
        ValueError,
        "this config is of model_type 'bert': the entmax Marian loads Marian checkpoints",
    ),
    Row("BERT config as a decoder", lambda t: bert(is_decoder=True), ValueError, "SparseBERT is an encoder"),
    Row("BERT config with cross-attention", lambda t: bert(add_cross_attention=True), ValueError, "is an encoder"),
    Row(
        "entmax_alpha set after construction",
        lambda t: _with_config(bert_model(attention_fn="entmax_bisect"), entmax_alpha=5.0)(ids()),
        ValueError,
        "entmax_alpha",
    ),
    Row(
        "attn_implementation for the entmax Marian",
        lambda t: (
            MarianMTModel(MarianConfig(**MARIAN)).save_pretrained(t),
            EntmaxSparsefinderMarianMTModel.from_pretrained(t, attn_implementation="sdpa"),
        ),
        ValueError,
        "attn_implementation='sdpa' would run softmax instead",
    ),
    Row(
        "attn_implementation eager for SparseBERT",
        lambda t: (
            SparseBertModel(bert()).save_pretrained(t),
            SparseBertModel.from_pretrained(t, attn_implementation="eager"),
        ),
        ValueError,
        "(asked: 'eager'): it computes attention with the kernel config.attention_backend picks",
    ),
    Row(
        "attn_implementation sdpa for SparseBERT",
        lambda t: (
            SparseBertModel(bert()).save_pretrained(t),
            SparseBertModel.from_pretrained(t, attn_implementation="sdpa"),
        ),
        ValueError,
        "give attention_backend='sdpa' instead",
    ),
    Row(
        "a config another model was built with (documented: builds)",
        lambda t: (lambda config: (SparseBertModel(config), SparseBertModel(config)))(bert()),
        None,
        result=lambda models: all(isinstance(m, SparseBertModel) for m in models),
    ),
    Row(
        "a stock BertConfig a BertForMaskedLM was built with (documented: builds)",
        lambda t: (lambda config: (BertForMaskedLM(config), SparseBertModel(config)))(
            tiny_bert_config()
        ),
        None,
        result=lambda models: isinstance(models[1], SparseBertModel),
    ),
    Row("a Marian config for SparseBERT", lambda t: SparseBertModel(marian()), ValueError, "takes a SparseBertConfig"),
    # -- callbacks and CLI -------------------------------------------------------------------------------------
    Row("DAMCallback temperature 0", lambda t: DAMCallback(temperature=0), ValueError, "temperature must be"),
    Row("DAMCallback temperature NaN", lambda t: DAMCallback(temperature=math.nan), ValueError, "got nan"),
    Row("DAMCallback penalty negative", lambda t: DAMCallback(penalty=-1), ValueError, "penalty must be"),
    Row("DAMCallback gate lr 0", lambda t: DAMCallback(gate_learning_rate=0.0), ValueError, "gate_learning_rate"),
    Row("DAMCallback target 1.5", lambda t: DAMCallback(target_sparsity=1.5), ValueError, "target_sparsity"),
    Row("DAMCallback schedule", lambda t: DAMCallback(temperature_schedule="exp"), ValueError, "exp"),
    Row(
        "CLI benchmark bad spec",
        lambda t: cli.main(["benchmark", "--patterns", "windw:3", "--lengths", "128"]),
        SystemExit,
        "hf-sparse benchmark: unknown pattern 'windw'",
    ),
]


def test_the_table_has_at_least_forty_rows_with_distinct_names():
    assert len(ROWS) >= 40 and len({r.name for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input(row, tmp_path):
    if row.error is None:
        with torch.no_grad():
            assert row.result(row.action(tmp_path)), row.name
        return
    with pytest.raises(row.error) as info:
        with torch.no_grad():
            row.action(tmp_path)
    message = str(info.value.code) if isinstance(info.value, SystemExit) else str(info.value)
    assert row.fragment in message, f"{row.name}: {message}"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["dam", "--steps", "-5"], "argument --steps: must be a whole number >= 1, got '-5'"),
        (["dam", "--steps", "0"], "argument --steps: must be a whole number >= 1, got '0'"),
        (["dam", "--target-sparsity", "1.5"], "argument --target-sparsity: must be a number in (0, 1)"),
        (["dam", "--gate-lr", "0"], "argument --gate-lr: must be a number in (0, inf]"),
        (["sparsefinder", "--recall", "2"], "argument --recall: must be a number in (0, 1], got '2'"),
        (["sparsefinder", "--window", "-1"], "argument --window: must be a whole number >= 0"),
        (["patterns", "--n", "0"], "argument --n: must be a whole number >= 1, got '0'"),
        (["demo", "--max-length", "x"], "argument --max-length: must be a whole number >= 3, got 'x'"),
        (["benchmark", "--lengths", "0"], "argument --lengths: must be a whole number >= 1, got '0'"),
        (["finetune", "--num-labels", "1"], "argument --num-labels: must be a whole number >= 2, got '1'"),
    ],
)
def test_cli_numbers_are_checked_before_any_work(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err
