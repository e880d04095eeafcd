"""Sparsefinder on machine translation, end to end: what ``hf-sparse sparsefinder --task translation`` and
``scripts/run_translation_sparsefinder.py`` run, written once.

A run is a short story:

1. **Data**: (source, target) pairs split into train / dev / test: the gettext catalogues of this machine
   (:func:`hf_sparse.translation.gettext_parallel_corpus`), a :class:`~hf_sparse.translation.ParallelCorpus`, or a
   ``datasets.DatasetDict`` with ``train`` and ``validation`` (and optionally ``test``) splits holding a source and
   a target text column, or Hugging Face's translation format: one ``translation`` column of ``{language: text}``
   dicts (wmt16, opus_books, Transformers' ``run_translation.py``), read with ``source_lang`` / ``target_lang``.
2. **Model**: a small entmax Marian trained from scratch with a new joint BPE tokenizer, or a Marian / entmax-Marian
   checkpoint (local directory or Hub id, with its tokenizer) fine-tuned with ``Seq2SeqTrainer``. A softmax decoder
   self-attention becomes 1.5-entmax (Sparsefinder predicts the pairs entmax keeps; softmax keeps them all).
3. **Fit**: the predictors of the decoder self-attention learn from the model's own teacher-forced attention on
   ``fit_sentences`` training pairs; the model's weights do not change.
4. **Sweep and operating point** on the dev pairs: the chosen method's sweep (and, for the plot, every other
   method's); the operating point is the sparsest setting whose dev recall reaches ``target_recall``.
5. **Test**: the predictors' sparsity and recall at the operating point, and BLEU/chrF of full entmax against
   decoding with the decoder self-attention restricted to the predicted pairs.
6. **Save** under ``output_dir/model``: the fitted checkpoint with its tokenizer (loads with
   ``AutoModelForSeq2SeqLM.from_pretrained(dir, trust_remote_code=True)``), ``metrics.json``, ``pareto.png`` and a
   model card (``README.md``).

Not imported by modeling code (remote code never needs it).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from .checks import check_int, check_number
from .translation import (
    ParallelCorpus,
    bleu_chrf,
    encode_pairs,
    gettext_parallel_corpus,
    small_marian_config,
    teacher_forced_batches,
    train_bpe_tokenizer,
    translate,
)

logger = logging.getLogger(__name__)

#: the column of Hugging Face's translation datasets (wmt16, opus_books, opus100, ...) and of Transformers'
#: ``run_translation.py``: one ``{language code: text}`` dict per row, the languages chosen by the user
TRANSLATION_COLUMN = "translation"

#: the methods whose predictors are fitted (learned projections); the baselines need no fitting and are swept only
FITTED_METHODS = ("distance", "quantization", "clustering")

# Every predictor of hf_sparse.sparsefinder, each swept over the setting that trades sparsity for recall on small
# MT models (graphs of at most a few dozen target tokens); the other settings are the run's (its window is added to
# every method, except where the window itself is swept).
MT_SWEEP = {
    "distance": [{"threshold": t} for t in (0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)],
    "quantization": [{"num_buckets": b} for b in (2, 3, 4, 6, 8)],
    "clustering": [{"num_clusters": c} for c in (2, 4, 8, 16)],
    "window": [{"window": w} for w in (0, 1, 2, 3, 4, 6, 8, 12)],
    "lsh": [{"num_buckets": b} for b in (2, 4, 8)],
    "routing": [{"num_clusters": c} for c in (2, 4, 8)],
    "bigbird": [{"window": w, "random_keys": r} for w in (1, 3) for r in (1, 2, 4)],
}

MARIAN_STAGE = "marian"  # the Marian's training: its checkpoints are under OUTPUT_DIR/checkpoints/marian

NEW_MODEL_LEARNING_RATE = 1e-3  # a small Marian from scratch (benchmarks/sparsefinder_mt.md)
FINE_TUNING_LEARNING_RATE = 5e-5  # a pretrained checkpoint: small steps keep what it knows


@dataclass
class TranslationSparsefinderRun:
    """What a run produced: ``metrics`` (also ``model_dir/metrics.json``), the fitted model in memory, and the
    details a report needs (losses, every sweep row, per-layer test graphs, translations, timings)."""

    metrics: dict
    model: torch.nn.Module
    tokenizer: object
    corpus: ParallelCorpus
    model_dir: str
    operating_point: dict  # the chosen sweep row (``overrides``: its setting as a dict)
    rows: list[dict] = field(default_factory=list)  # every sweep row on the dev pairs (hf_sparse.evaluation.pareto)
    train_losses: list[dict] = field(default_factory=list)  # Trainer log entries with a "loss"
    fit_losses: dict = field(default_factory=dict)  # layer -> margin loss per fitting step
    test_graph: dict = field(default_factory=dict)  # hf_sparse.evaluation.sparsity_recall on the test pairs
    translations: dict = field(default_factory=dict)  # "full entmax" / "predicted sparse" -> test translations
    seconds: dict = field(default_factory=dict)  # stage -> wall-clock seconds
    settings: dict = field(default_factory=dict)  # the run's arguments, defaults resolved (learning rate, sizes, ...)


def _marian_source(model: str) -> dict:
    """The checkpoint's config as a dict, refusing anything that is not a Marian / entmax-Marian checkpoint."""
    from .configuration_entmax_marian import EntmaxSparsefinderMarianConfig

    try:
        config_dict, _ = EntmaxSparsefinderMarianConfig.get_config_dict(model)
    except OSError as error:
        raise ValueError(
            f"model {model!r}: no checkpoint there (a local directory with config.json or a Hub id): {error}"
        ) from error
    kind = config_dict.get("model_type")
    if kind != EntmaxSparsefinderMarianConfig.model_type:  # get_config_dict already maps "marian" to ours
        raise ValueError(
            f"model {model!r} is a {kind!r} checkpoint; valid: a Marian checkpoint (model_type 'marian', e.g. "
            f"Helsinki-NLP/opus-mt-*) or an entmax Marian ('{EntmaxSparsefinderMarianConfig.model_type}')"
        )
    return config_dict


def _load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"model {model!r} has no tokenizer that loads with AutoTokenizer (save it next to the checkpoint; a "
            f"stock Marian tokenizer needs `pip install sentencepiece`): {error}"
        ) from error


def _pair_fields(
    source_column: str | None, target_column: str | None, source_lang: str | None, target_lang: str | None
) -> tuple[str, str, bool]:
    """``(source, target, nested)``: where the pairs are read. Two plain text columns (default ``source`` and
    ``target``), or, given ``source_lang`` and ``target_lang``, two languages of the :data:`TRANSLATION_COLUMN`
    (``nested``). Columns and languages together are refused: which of the two the user meant is not ours to
    guess."""
    if source_lang is None and target_lang is None:
        return source_column or "source", target_column or "target", False
    if source_lang is None or target_lang is None:
        raise ValueError(
            f"give source_lang and target_lang together (got source_lang={source_lang!r}, "
            f"target_lang={target_lang!r}): the two languages of the {TRANSLATION_COLUMN!r} column to pair"
        )
    for name, value in (("source_lang", source_lang), ("target_lang", target_lang)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a language code of the {TRANSLATION_COLUMN!r} column, got {value!r}")
    if source_lang == target_lang:
        raise ValueError(f"source_lang and target_lang are both {source_lang!r}: translation needs two languages")
    columns = [name for name, value in (("source_column", source_column), ("target_column", target_column)) if value]
    if columns:
        raise ValueError(
            f"{' and '.join(columns)} with source_lang / target_lang is ambiguous: give two plain text columns "
            f"(source_column, target_column) or two languages of the {TRANSLATION_COLUMN!r} column of "
            "{language: text} dicts (source_lang, target_lang), not both"
        )
    return source_lang, target_lang, True


def _languages_of(split, name: str) -> list[str]:
    """The language codes of a split's :data:`TRANSLATION_COLUMN`: a ``datasets.Translation`` feature or a struct of
    texts (what json/jsonl/parquet files with ``{"translation": {"de": ..., "en": ...}}`` rows load as)."""
    from datasets import TranslationVariableLanguages

    if TRANSLATION_COLUMN not in split.column_names:
        raise ValueError(
            f"split {name!r} has no column {TRANSLATION_COLUMN!r} (source_lang / target_lang read Hugging Face's "
            f"translation format: one {{language: text}} dict per row); its columns: {split.column_names} (for two "
            "plain text columns, set source_column / target_column instead)"
        )
    feature = split.features[TRANSLATION_COLUMN]
    if isinstance(feature, TranslationVariableLanguages):
        raise ValueError(
            f"split {name!r}: column {TRANSLATION_COLUMN!r} holds a varying set of languages per row "
            "(TranslationVariableLanguages); only one {language: text} dict per row with fixed languages is read"
        )
    languages = getattr(feature, "languages", None)  # datasets.Translation
    if languages is None and isinstance(feature, dict):
        languages = list(feature)
    if not languages:
        raise ValueError(
            f"split {name!r}: column {TRANSLATION_COLUMN!r} holds {feature}, not one {{language: text}} dict per row"
        )
    return list(languages)


def _pairs_of(split, name: str, fields: tuple[str, str, bool]) -> list[tuple[str, str]]:
    source_column, target_column, nested = fields
    if nested:
        languages = _languages_of(split, name)
        missing = [lang for lang in (source_column, target_column) if lang not in languages]
        if missing:
            raise ValueError(
                f"split {name!r}: its {TRANSLATION_COLUMN!r} column has no language {', '.join(map(repr, missing))}; "
                f"languages present: {', '.join(sorted(languages))} (set source_lang / target_lang)"
            )
        # flattened, the languages are plain columns ("translation.de"), read by Arrow without a dict per row
        split = split.select_columns([TRANSLATION_COLUMN]).flatten()
        source_column, target_column = (f"{TRANSLATION_COLUMN}.{lang}" for lang in (source_column, target_column))
    missing = [c for c in (source_column, target_column) if c not in split.column_names]
    if missing:
        raise ValueError(
            f"split {name!r} has no column(s) {missing}; its columns: {split.column_names} (set source_column / "
            "target_column)"
        )
    pairs = list(zip(split[source_column], split[target_column]))
    bad = [
        i
        for i, (s, t) in enumerate(pairs)
        if not (isinstance(s, str) and s.strip() and isinstance(t, str) and t.strip())
    ]
    if bad:
        raise ValueError(
            f"split {name!r}: rows {bad[:5]}{' ...' if len(bad) > 5 else ''} have an empty or non-text "
            f"{source_column!r} / {target_column!r} (first: {pairs[bad[0]]!r}); every pair needs two texts"
        )
    return pairs


def _corpus_from_dataset(dataset, fields: tuple[str, str, bool], dev_size: int, test_size: int):
    """train / dev / test from a ``DatasetDict``: ``validation`` gives the dev pairs (its first ``dev_size``) and
    ``test`` the test pairs (its first ``test_size``); without a ``test`` split, the validation split's pairs after
    the first ``dev_size`` are the test pairs (``test_size`` of them, so it must hold ``dev_size + test_size``).
    Which of the two it was is logged: the test numbers mean something else in each case."""
    needed = [s for s in ("train", "validation") if s not in dataset]
    if needed:
        raise ValueError(
            f"the dataset has no {needed} split(s); its splits: {list(dataset)}. Needed: 'train' (training and "
            "fitting), 'validation' (sweep and operating point), optionally 'test' (else carved out of validation)"
        )
    train = _pairs_of(dataset["train"], "train", fields)
    validation = _pairs_of(dataset["validation"], "validation", fields)
    if "test" in dataset:
        test = _pairs_of(dataset["test"], "test", fields)[:test_size]
        dev = validation[:dev_size]
        logger.info(f"test pairs: the first {len(test)} of the dataset's test split")
    else:
        if len(validation) < dev_size + test_size:
            raise ValueError(
                f"the validation split has {len(validation)} pairs: too few to hold out dev_size={dev_size} + "
                f"test_size={test_size} (there is no 'test' split); give a 'test' split or smaller dev/test sizes"
            )
        dev, test = validation[:dev_size], validation[dev_size : dev_size + test_size]
        logger.info(
            f"test pairs: validation pairs {dev_size}-{dev_size + test_size - 1} (the dataset has no test split; "
            f"the first {dev_size} are the dev pairs)"
        )
    for name, pairs in (("train", train), ("validation", dev), ("test", test)):
        if not pairs:
            raise ValueError(f"the {name!r} split is empty")
    return ParallelCorpus(train=train, dev=dev, test=test)


def _is_dataset_dict(pairs) -> bool:
    try:
        from datasets import DatasetDict
    except ImportError:  # datasets not installed: then it cannot be one
        return False
    return isinstance(pairs, DatasetDict)


def _checked(
    *,
    model,
    steps,
    batch_size,
    learning_rate,
    vocab_size,
    d_model,
    max_length,
    method,
    projection_dim,
    window,
    target_recall,
    fit_sentences,
    fit_epochs,
    dev_size,
    test_size,
    num_beams,
    save_steps,
    **_,
) -> dict:
    """Every argument of :func:`run_translation_sparsefinder` checked before any work, the bad value named; returns
    the case-dependent defaults filled in (``learning_rate``, and ``vocab_size`` / ``d_model`` for a new model)."""
    if method not in FITTED_METHODS:
        raise ValueError(f"method must be one of {', '.join(FITTED_METHODS)} (the fitted predictors), got {method!r}")
    for name, value, least in (
        ("steps", steps, 0),
        ("batch_size", batch_size, 1),
        ("max_length", max_length, 2),
        ("projection_dim", projection_dim, 1),
        ("window", window, 0),
        ("fit_sentences", fit_sentences, 1),
        ("fit_epochs", fit_epochs, 1),
        ("dev_size", dev_size, 1),
        ("test_size", test_size, 1),
        ("num_beams", num_beams, 1),
        ("save_steps", save_steps, 0),
    ):
        check_int(name, value, at_least=least)
    check_number("target_recall", target_recall, above=0.0, at_most=1.0)
    if learning_rate is not None:
        check_number("learning_rate", learning_rate, above=0.0)
    if model is not None:
        given = [n for n, v in (("vocab_size", vocab_size), ("d_model", d_model)) if v is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} shape a new model only; model {model!r} has its own")
        limit = _marian_source(model).get("max_position_embeddings")
        if limit is not None and max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds model {model!r}'s max_position_embeddings {limit}")
        return {"learning_rate": FINE_TUNING_LEARNING_RATE if learning_rate is None else learning_rate}
    if steps == 0:
        raise ValueError("steps=0 without a model: a new model must be trained (steps >= 1), or give model=...")
    vocab_size = 8000 if vocab_size is None else vocab_size
    d_model = 128 if d_model is None else d_model
    check_int("vocab_size", vocab_size, at_least=8)
    check_int("d_model", d_model, at_least=4)
    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of the 4 attention heads, got {d_model}")
    learning_rate = NEW_MODEL_LEARNING_RATE if learning_rate is None else learning_rate
    return {"learning_rate": learning_rate, "vocab_size": vocab_size, "d_model": d_model}


def load_pairs(
    pairs=None,
    lang: str = "de",
    source_column: str | None = None,
    target_column: str | None = None,
    dev_size: int = 500,
    test_size: int = 500,
    seed: int = 0,
    *,
    source_lang: str | None = None,
    target_lang: str | None = None,
) -> ParallelCorpus:
    """train / dev / test pairs from what :func:`run_translation_sparsefinder` accepts as ``pairs`` (see there)."""
    fields = _pair_fields(source_column, target_column, source_lang, target_lang)
    named = [
        name
        for name, value in zip(
            ("source_column", "target_column", "source_lang", "target_lang"),
            (source_column, target_column, source_lang, target_lang),
        )
        if value is not None
    ]
    if named and not _is_dataset_dict(pairs):  # said, not ignored: the user meant some data that is not there
        given = "None (the gettext pairs: English→lang)" if pairs is None else type(pairs).__name__
        raise ValueError(
            f"{' and '.join(named)} {'pick' if len(named) > 1 else 'picks'} the columns or the "
            f"{TRANSLATION_COLUMN!r} languages of a datasets.DatasetDict; pairs is {given}"
        )
    if pairs is None:
        try:
            corpus = gettext_parallel_corpus(lang, dev_size=dev_size, test_size=test_size, seed=seed)
        except FileNotFoundError as error:  # an unknown language: bad input, said as such
            raise ValueError(str(error)) from error
        logger.info(f"test pairs: {len(corpus.test)} English→{lang} gettext pairs held out (seed {seed})")
        return corpus
    if isinstance(pairs, ParallelCorpus):
        empty = [name for name in ("train", "dev", "test") if not getattr(pairs, name)]
        if empty:
            raise ValueError(f"the ParallelCorpus has no {' / '.join(empty)} pairs")
        logger.info("test pairs: the given ParallelCorpus's test pairs")
        return pairs
    if _is_dataset_dict(pairs):
        return _corpus_from_dataset(pairs, fields, dev_size, test_size)
    raise TypeError(
        f"pairs must be None (gettext), a ParallelCorpus or a datasets.DatasetDict, got {type(pairs).__name__}"
    )


def build_model(
    model: str | None, corpus: ParallelCorpus, sparsefinder: dict, vocab_size: int, d_model: int, max_length: int
):
    """``(model, tokenizer)``: a new small entmax Marian with a new BPE tokenizer (``model=None``), or the
    checkpoint's weights and tokenizer with entmax decoder self-attention and fresh, unfitted predictors.

    A checkpoint's own predictors (say, another method's) are dropped, never mixed with the new settings: their
    state would not match the new config, and they are refitted anyway.
    """
    from .configuration_entmax_marian import EntmaxSparsefinderMarianConfig
    from .modeling_entmax_marian import EntmaxSparsefinderMarianMTModel

    if model is None:
        tokenizer = train_bpe_tokenizer([text for pair in corpus.train for text in pair], vocab_size)
        config = small_marian_config(tokenizer, d_model, sparsefinder, max_position_embeddings=max(64, max_length))
        return EntmaxSparsefinderMarianMTModel(config), tokenizer
    tokenizer = _load_tokenizer(model)
    config = EntmaxSparsefinderMarianConfig.from_pretrained(model)
    fn = "entmax15" if config.decoder_attention_fn == "softmax" else config.decoder_attention_fn
    if config.decoder_attention_fn == "softmax":
        logger.info(
            f"{model}: softmax decoder self-attention becomes 1.5-entmax (fine-tune with steps > 0 to adapt it)"
        )
    if config.sparsefinder is None:
        net = EntmaxSparsefinderMarianMTModel.from_pretrained(model, decoder_attention_fn=fn, sparsefinder=sparsefinder)
        return net, tokenizer
    logger.info(f"{model}: its own predictors ({config.sparsefinder.get('method')}) are replaced by fresh ones to fit")
    loaded = EntmaxSparsefinderMarianMTModel.from_pretrained(model, decoder_attention_fn=fn)  # whole, as saved
    fresh = copy.deepcopy(loaded.config)
    fresh.sparsefinder = sparsefinder
    net = EntmaxSparsefinderMarianMTModel(fresh)
    weights = {k: v for k, v in loaded.state_dict().items() if ".sparsefinder." not in k}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if unexpected or any(".sparsefinder." not in k for k in missing):
        raise ValueError(f"model {model!r}: its weights do not fit the rebuilt model ({unexpected=}, {missing=})")
    return net, tokenizer


def train_translation(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    output_dir: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    max_length: int,
    seed: int,
    *,
    save_steps: int = 0,
    resume: bool = False,
) -> list[dict]:
    """``Seq2SeqTrainer`` (label smoothing 0.1, 10 % warm-up, length-grouped batches, progress bar and a loss log
    every ``steps // 10`` steps); returns the logged losses. Sparse execution stays off: MT training never touches
    the predictors.

    The stage ``marian`` of :mod:`hf_sparse.checkpointing`: a checkpoint every ``save_steps`` steps and at the last
    one under ``output_dir/checkpoints/marian``; ``resume`` starts from the newest (weights, optimizer, RNG, data
    order and the loss log), so the returned losses are an uninterrupted run's
    (:class:`hf_sparse.checkpointing.LogAtCheckpoints`).
    """
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    from .checkpointing import stage_arguments, train_stage

    args = Seq2SeqTrainingArguments(
        **stage_arguments(output_dir, MARIAN_STAGE, save_steps),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        adam_beta2=0.98,
        warmup_steps=max(steps // 10, 1),
        label_smoothing_factor=0.1,
        train_sampling_strategy="group_by_length",
        logging_steps=max(steps // 10, 1),
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=encode_pairs(tokenizer, pairs, max_length),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
    )
    train_stage(trainer, output_dir, MARIAN_STAGE, resume)
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def run_translation_sparsefinder(
    *,
    model: str | None = None,
    pairs=None,
    lang: str = "de",
    source_column: str | None = None,
    target_column: str | None = None,
    source_lang: str | None = None,
    target_lang: str | None = None,
    dataset_name: str | None = None,
    steps: int = 2000,
    batch_size: int = 64,
    learning_rate: float | None = None,
    vocab_size: int | None = None,
    d_model: int | None = None,
    max_length: int = 64,
    method: str = "distance",
    projection_dim: int = 4,
    window: int = 3,
    target_recall: float = 0.95,
    fit_sentences: int = 500,
    fit_epochs: int = 5,
    dev_size: int = 500,
    test_size: int = 500,
    num_beams: int = 1,
    compare_methods: bool = True,
    enabled: bool = True,
    seed: int = 0,
    output_dir: str = "outputs/translation_sparsefinder",
    repo_id: str | None = None,
    save_steps: int = 0,
    resume: bool = False,
) -> TranslationSparsefinderRun:
    """Train or fine-tune an entmax Marian, fit Sparsefinder on its decoder self-attention, pick an operating point
    on dev, measure it on test, and save the fitted checkpoint with ``metrics.json``, ``pareto.png`` and a card.

    Args:
        model: a Marian / entmax-Marian checkpoint with its tokenizer (local directory or Hub id) to fine-tune;
            None trains a small one (3+3 layers, 4 heads, ``d_model``) and a joint BPE tokenizer from scratch.
        pairs: None (the English→``lang`` gettext pairs of this machine, shuffled with ``seed``, ``dev_size`` +
            ``test_size`` held out), a :class:`ParallelCorpus`, or a ``datasets.DatasetDict`` with ``train`` and
            ``validation`` (optionally ``test``) splits of ``source_column`` / ``target_column`` texts (default
            ``source`` / ``target``), used in their order: dev = the first ``dev_size`` validation pairs, test =
            the first ``test_size`` test pairs (without a test split, the next ``test_size`` validation pairs;
            the log says which).
        source_lang, target_lang: instead of the two columns, Hugging Face's translation format (wmt16,
            opus_books, Transformers' ``run_translation.py``): the pairs are these two languages of the
            ``translation`` column's ``{language: text}`` dicts. Refused together with ``source_column`` /
            ``target_column``, and without a ``DatasetDict``.
        dataset_name: what the card calls the evaluation data (default: the gettext catalogues or "the given
            dataset").
        steps: MT training steps (0: none; then ``model`` must be given). ``learning_rate`` None: 1e-3 for a new
            model, 5e-5 to fine-tune a checkpoint.
        vocab_size, d_model: new model only (defaults 8000 and 128); refused with ``model``.
        max_length: tokens per side (truncation) and at most in generated translations.
        method: the predictor fitted and saved: ``distance``, ``quantization`` or ``clustering``; swept over
            :data:`MT_SWEEP`. ``compare_methods``: also sweep every other method for the plot (cheap: one
            collection of the dev attention serves all).
        projection_dim, window: Sparsefinder's r and always-attended local window.
        target_recall: the operating point is the sparsest sweep setting with dev recall >= this (else the most
            recalling one; ``metrics["target_recall_reached"]`` says which).
        fit_sentences, fit_epochs: training pairs (at most) and epochs the projections are fitted on.
        num_beams: beam size when translating the test pairs (1: greedy).
        enabled: the saved checkpoint attends only to the predicted pairs (False: it runs full entmax and carries
            the fitted predictors for ``config.sparsefinder["enabled"] = True`` later).
        repo_id: the id the card's loading snippet shows (say, the Hub id it will be pushed to; default the
            directory).
        save_steps: a Trainer checkpoint of the MT training every this many steps and at its last step, under
            ``output_dir/checkpoints/marian`` (0: none).
        resume: continue a stopped run in ``output_dir`` (same arguments): the training starts from its newest
            checkpoint, the rest is redone (seeded), and the run ends as an uninterrupted one, bit for bit.

    Returns a :class:`TranslationSparsefinderRun`; ``.metrics`` is what ``metrics.json`` holds.
    """
    arguments = {name: value for name, value in locals().items() if name != "pairs"}
    started = time.time()
    arguments.update(_checked(**arguments))  # the defaults that depend on the case, filled in
    learning_rate, vocab_size, d_model = (arguments[k] for k in ("learning_rate", "vocab_size", "d_model"))
    corpus = load_pairs(
        pairs,
        lang,
        source_column,
        target_column,
        dev_size,
        test_size,
        seed,
        source_lang=source_lang,
        target_lang=target_lang,
    )
    if dataset_name is None:
        dataset_name = f"English→{lang} gettext UI messages (test pairs)" if pairs is None else "the given dataset"
    logger.info(f"{len(corpus.train)} training / {len(corpus.dev)} dev / {len(corpus.test)} test pairs")

    seconds: dict[str, float] = {}
    settings = {"method": method, "projection_dim": projection_dim, "window": window}
    torch.manual_seed(seed)
    net, tokenizer = build_model(model, corpus, settings, vocab_size, d_model, max_length)

    t0 = time.time()
    train_losses = []
    if steps:
        logger.info(f"training {'a new Marian' if model is None else model} for {steps} steps")
        train_losses = train_translation(
            net,
            tokenizer,
            corpus.train,
            output_dir,
            steps,
            batch_size,
            learning_rate,
            max_length,
            seed,
            save_steps=save_steps,
            resume=resume,
        )
    seconds["MT training"] = time.time() - t0
    net.eval()

    from .evaluation import operating_point, pareto, predictor_like, sparsity_recall
    from .sparsefinder import CENTROID_METHODS, resolve_config
    from .sparsefinder_fit import collect_attention, fit

    # Predictors: fitted on training pairs; the sweep and the operating point on dev; measured on test.
    t0 = time.time()
    fit_pairs = corpus.train[:fit_sentences]
    fit_data = teacher_forced_batches(net, tokenizer, fit_pairs, max_length=max_length)
    fit_losses = fit(net, fit_data, epochs=fit_epochs, max_sentences=len(fit_pairs), seed=seed)
    seconds["predictor fitting"] = time.time() - t0

    t0 = time.time()
    os.makedirs(output_dir, exist_ok=True)
    png, csv = os.path.join(output_dir, "pareto.png"), os.path.join(output_dir, "pareto.csv")
    sweep = {method: MT_SWEEP[method]}
    if compare_methods:
        sweep.update({m: s for m, s in MT_SWEEP.items() if m != method})
    dev_data = teacher_forced_batches(net, tokenizer, corpus.dev, max_length=max_length)
    rows = pareto(net, dev_data, sweep, csv_path=csv, png_path=png, max_sentences=len(corpus.dev))
    point = operating_point(rows, method, target_recall)
    chosen = resolve_config({**settings, **point["overrides"]})
    if method in CENTROID_METHODS:  # k-means centroids for the chosen number of clusters; projections are kept
        collected = collect_attention(net, fit_data, max_sentences=len(fit_pairs), progress=False)
        for layer, module in net.sparsefinder_modules().items():
            module.sparsefinder = predictor_like(module.sparsefinder, chosen, collected[layer])
    net.config.sparsefinder = chosen
    test_data = teacher_forced_batches(net, tokenizer, corpus.test, max_length=max_length)
    test_graph = sparsity_recall(net, test_data, max_sentences=len(corpus.test))
    seconds["sweep and test recall"] = time.time() - t0
    logger.info(
        f"operating point {method} {point['setting']}: dev graph sparsity {point['graph_sparsity']:.3f}, recall "
        f"{point['recall']:.3f} (target {target_recall}); test recall {test_graph['average']['recall']:.3f}"
    )

    # Translation quality: full entmax vs decoder self-attention restricted to the predicted pairs.
    sources, references = [s for s, _ in corpus.test], [t for _, t in corpus.test]
    quality, translations = {}, {}
    for name, sparse in (("full entmax", False), ("predicted sparse", True)):
        net.config.sparsefinder = {**chosen, "enabled": sparse}
        t0 = time.time()
        translations[name] = translate(
            net, tokenizer, sources, num_beams=num_beams, max_length=max_length, desc=f"translating ({name})"
        )
        seconds[f"decoding, {name}"] = time.time() - t0
        quality[name] = bleu_chrf(translations[name], references)
        logger.info(f"{name}: BLEU {quality[name]['bleu']:.2f}, chrF {quality[name]['chrf']:.2f}")
    net.config.sparsefinder = {**chosen, "enabled": enabled}

    dev, test = point, test_graph["average"]
    metrics = {
        "method": method,
        "operating_point": point["setting"],
        "target_recall": float(target_recall),
        "target_recall_reached": bool(point["recall"] >= target_recall),
        "dev_gold_sparsity": dev["gold_sparsity"],
        "dev_graph_sparsity": dev["graph_sparsity"],
        "dev_recall": dev["recall"],
        "dev_exact": dev["exact"],
        "test_gold_sparsity": test["gold_sparsity"],
        "test_graph_sparsity": test["graph_sparsity"],
        "test_recall": test["recall"],
        "test_exact": test["exact"],
        "test_bleu_full_entmax": quality["full entmax"]["bleu"],
        "test_chrf_full_entmax": quality["full entmax"]["chrf"],
        "test_bleu_predicted_sparse": quality["predicted sparse"]["bleu"],
        "test_chrf_predicted_sparse": quality["predicted sparse"]["chrf"],
        "training_steps": steps,
        "train_pairs": len(corpus.train),
        "fit_pairs": len(fit_pairs),
        "dev_pairs": len(corpus.dev),
        "test_pairs": len(corpus.test),
    }
    if train_losses:
        metrics["final_training_loss"] = float(train_losses[-1]["loss"])

    model_dir = os.path.join(output_dir, "model")
    save_with_card(net, tokenizer, model_dir, metrics, png, model, dataset_name, repo_id)
    seconds["total"] = time.time() - started
    logger.info(f"fitted checkpoint, tokenizer, metrics.json, pareto.png and model card in {model_dir}")
    return TranslationSparsefinderRun(
        metrics=metrics,
        model=net,
        tokenizer=tokenizer,
        corpus=corpus,
        model_dir=model_dir,
        operating_point=point,
        rows=rows,
        train_losses=train_losses,
        fit_losses=fit_losses,
        test_graph=test_graph,
        translations=translations,
        seconds=seconds,
        settings=arguments,
    )


def save_with_card(
    model,
    tokenizer,
    model_dir: str,
    metrics: dict,
    pareto_png: str,
    source: str | None,
    dataset_name: str,
    repo_id: str | None = None,
) -> None:
    """Checkpoint + tokenizer + ``metrics.json`` + ``pareto.png`` + ``README.md`` (the card) in ``model_dir``.

    The card's results leave out ``target_recall`` (a setting, said in the description, not a measurement).
    """
    from .cards import save_with_card

    os.makedirs(model_dir, exist_ok=True)
    shutil.copy(pareto_png, os.path.join(model_dir, "pareto.png"))
    method, setting = metrics["method"], metrics["operating_point"]
    reached = "reaches" if metrics["target_recall_reached"] else "misses (no sweep setting reached it)"
    origin = f"`{source}` fine-tuned" if source else "A small Marian trained from scratch"
    description = (
        f"{origin}, with {model.config.decoder_attention_fn} decoder self-attention and fitted Sparsefinder "
        f"predictors ({method}) for it. "
        f"Operating point **{method} {setting}**: the sparsest swept setting whose dev recall "
        f"{reached} the target {metrics['target_recall']:g}: dev graph sparsity "
        f"{100 * metrics['dev_graph_sparsity']:.1f} %, recall {100 * metrics['dev_recall']:.1f} %; on the test "
        f"pairs BLEU {metrics['test_bleu_full_entmax']:.2f} with full entmax and "
        f"{metrics['test_bleu_predicted_sparse']:.2f} attending only to the predicted pairs."
    )
    hub_id = source if source and not os.path.isdir(source) else None
    save_with_card(
        model,
        tokenizer,
        model_dir,
        metrics,
        repo_id=repo_id or model_dir,
        title=f"Entmax Marian with Sparsefinder ({method})",
        description=description,
        card_metrics={k: v for k, v in metrics.items() if k != "target_recall"},
        dataset=dataset_name,
        base_model=hub_id,
        plots={"predicted-graph sparsity vs recall of every swept method (dev pairs)": "pareto.png"},
    )


__all__ = [
    "MT_SWEEP",
    "TRANSLATION_COLUMN",
    "TranslationSparsefinderRun",
    "build_model",
    "load_pairs",
    "run_translation_sparsefinder",
]
