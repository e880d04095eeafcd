"""Small masked-LM pre-training on the offline corpus: the experiment behind ``hf-sparse demo`` and the
SparseBERT scripts (importance analysis, reproduction table), written once.

A run is: texts (the user's ``datasets`` data, or by default the English gettext messages) → a WordPiece tokenizer
trained on them (or the model's own) → BERT-style packed blocks → a SparseBERT → ``Trainer`` with BERT's 15%
masking → held-out masked-LM metrics on fixed masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from .checkpointing import stage_arguments, train_stage
from .configuration_sparse_bert import SparseBertConfig
from .data import LOCALE_DIR, english_corpus, pack_into_blocks, train_wordpiece_tokenizer


@dataclass
class MLMCorpus:
    """Packed ``[CLS] … [SEP]`` blocks (``datasets.Dataset`` with ``input_ids``) and the tokenizer that made them."""

    tokenizer: object
    train: object
    eval: object


def mlm_corpus(
    data, tokenizer=None, *, text_column: str = "text", vocab_size: int = 4000, block_size: int = 128
) -> MLMCorpus:
    """Blocks of ``block_size`` tokens from a ``DatasetDict`` with ``train`` and ``validation`` texts.

    ``tokenizer``: the model's own; ``None`` trains a WordPiece vocabulary of ``vocab_size`` on the training texts
    only (nothing held out leaks into it). Fails, naming the sizes, when a split is too short to fill one block.
    """
    if tokenizer is None:
        tokenizer = train_wordpiece_tokenizer(list(data["train"][text_column]), vocab_size=vocab_size)
    corpus = MLMCorpus(
        tokenizer,
        pack_into_blocks(data["train"], tokenizer, text_column, block_size),
        pack_into_blocks(data["validation"], tokenizer, text_column, block_size),
    )
    splits = (("training", corpus.train, data["train"]), ("held-out", corpus.eval, data["validation"]))
    for name, blocks, texts in splits:
        if len(blocks) == 0:
            raise ValueError(
                f"the {len(texts)} {name} texts do not fill one block of {block_size} tokens: use more text or a "
                "smaller max length"
            )
    return corpus


def offline_mlm_corpus(
    lang: str = "de",
    max_sentences: int | None = None,
    eval_sentences: int = 2000,
    vocab_size: int = 4000,
    block_size: int = 128,
    seed: int = 0,
    locale_dir: str = LOCALE_DIR,
) -> MLMCorpus:
    """The offline default: English gettext messages split by message, tokenizer trained on the training ones."""
    data = english_corpus(lang, max_sentences, eval_sentences, seed, locale_dir)
    return mlm_corpus(data, vocab_size=vocab_size, block_size=block_size)


def corpus_for_tokenizer(
    tokenizer,
    lang: str = "de",
    max_sentences: int | None = None,
    eval_sentences: int = 2000,
    block_size: int = 128,
    seed: int = 0,
    locale_dir: str = LOCALE_DIR,
) -> MLMCorpus:
    """The same messages and split as :func:`offline_mlm_corpus`, packed with an existing model's ``tokenizer``."""
    data = english_corpus(lang, max_sentences, eval_sentences, seed, locale_dir)
    return mlm_corpus(data, tokenizer, block_size=block_size)


def fixed_mask_batches(examples: list[dict], tokenizer, size: int = 16, seed: int = 0) -> list[dict]:
    """Model inputs with BERT's 15 % masking drawn once (from ``seed``), without labels: the batches Sparsefinder
    fits on and measures, identical on every pass."""
    examples = list(examples)  # a Dataset (or its .select) iterates as example dicts
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        batches = [collator(examples[start : start + size]) for start in range(0, len(examples), size)]
    finally:
        torch.random.set_rng_state(state)
    for batch in batches:
        batch.pop("labels")
    return batches


@dataclass
class ResumableMaskingCollator(DataCollatorForLanguageModeling):
    """BERT's dynamic masking whose ``k``-th batch is drawn from its own generator, seeded by (``seed``, process,
    ``k``), so that a run resumed from a checkpoint masks every later batch as the uninterrupted run did.

    The stock collator draws from the global RNG, which Trainer checkpoints; but accelerate's data loader collates
    one batch ahead of training, so the RNG state in a checkpoint has already drawn the next batch's masks, and a
    resumed run would mask all later batches differently. :class:`MaskingPosition` sets ``k`` to the batches
    already trained on when training (re)starts. One counter per process: Trainer's default of no data-loader
    workers.
    """

    seed: int = 0
    batches: int = 0
    process: int = 0

    def torch_call(self, examples):
        self.generator = torch.Generator().manual_seed(hash((self.seed, self.process, self.batches)) % 2**63)
        self._generator_pid = os.getpid()  # what the parent class checks before replacing the generator
        self.batches += 1
        return super().torch_call(examples)


class MaskingPosition(TrainerCallback):
    """Where a :class:`ResumableMaskingCollator` is in the data when training (re)starts: the batches consumed."""

    def __init__(self, collator: ResumableMaskingCollator):
        self.collator = collator

    def on_train_begin(self, args, state, control, **kwargs):
        self.collator.batches = state.global_step * args.gradient_accumulation_steps
        self.collator.process = args.process_index


def small_bert_config(tokenizer, block_size: int = 128, **overrides) -> SparseBertConfig:
    """A BERT small enough to pre-train on two CPU cores in minutes (4 heads of 32, 2 layers)."""
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=block_size,
        pad_token_id=tokenizer.pad_token_id,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return SparseBertConfig(**{**settings, **overrides})


def train_mlm(
    model,
    corpus: MLMCorpus,
    out_dir: str,
    steps: int,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    callbacks: list[TrainerCallback] | None = None,
    optimizer_cls_and_kwargs=None,
    weight_decay: float = 0.0,
    *,
    stage: str = "mlm",
    save_steps: int = 0,
    resume: bool = False,
) -> Trainer:
    """Masked-LM training with Trainer (progress bar and loss logs every ``steps // 10`` steps).

    ``stage`` names this Trainer run's checkpoint folder ``out_dir/checkpoints/<stage>``, written every
    ``save_steps`` steps (0: none); ``resume`` starts from the newest one there (:mod:`hf_sparse.checkpointing`).
    """
    args = TrainingArguments(
        **stage_arguments(out_dir, stage, save_steps),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=max(steps // 10, 1),
        logging_steps=max(steps // 10, 1),
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )
    if callable(optimizer_cls_and_kwargs):  # a factory (model, args) -> (cls, kwargs), e.g. DAMCallback's
        optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(model, args)
    collator = ResumableMaskingCollator(corpus.tokenizer, mlm_probability=0.15, seed=seed)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=corpus.train,
        data_collator=collator,
        callbacks=[MaskingPosition(collator), *(callbacks or [])],
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
    )
    return train_stage(trainer, out_dir, stage, resume)


def search_and_train_dam(
    model,
    corpus: MLMCorpus,
    out_dir: str,
    steps: int,
    *,
    search_steps: int | None = None,
    target_sparsity: float | None = 0.9,
    penalty: float = 1e-4,
    penalty_schedule: str = "linear",
    gate_learning_rate: float = 0.05,
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    save_steps: int = 0,
    resume: bool = False,
) -> dict:
    """SparseBERT's DAM as two Trainer runs on a model built with a ``dam`` config.

    1. Search: gates and model train together for at most ``search_steps`` (default ``steps // 2``), λ rising
       linearly from 0 to ``penalty`` (``penalty_schedule="linear"``, so the model learns before the mask thins) or
       constant; the search stops once the mask reaches ``target_sparsity``; ``DAMCallback`` freezes the mask.
    2. The remaining steps train with the frozen mask (fresh optimizer and warm-up).

    The two are the checkpoint stages ``dam_search`` and ``dam_frozen`` (``save_steps``, ``resume``: see
    :func:`train_mlm`).

    Returns ``{"search_steps", "train_steps", "sparsity"}`` (sparsity: the fraction of all pairs the frozen model
    drops at ``length``, pattern ∩ mask, averaged over gate groups and heads: ``1 - dam_density``).
    """
    from .callbacks import DAMCallback

    length = model.config.max_position_embeddings
    search = DAMCallback(
        penalty=0.0 if penalty_schedule == "linear" else penalty,
        final_penalty=penalty,
        penalty_schedule=penalty_schedule,
        gate_learning_rate=gate_learning_rate,
        target_sparsity=target_sparsity,
        density_length=length,
    )
    trainer = train_mlm(
        model,
        corpus,
        out_dir,
        steps=search_steps if search_steps is not None else steps // 2,
        learning_rate=learning_rate,
        batch_size=batch_size,
        seed=seed,
        callbacks=[search],
        optimizer_cls_and_kwargs=search.optimizer_cls_and_kwargs,
        stage="dam_search",
        save_steps=save_steps,
        resume=resume,
    )
    searched = trainer.state.global_step
    if steps > searched:
        train_mlm(
            model,
            corpus,
            out_dir,
            steps=steps - searched,
            learning_rate=learning_rate,
            batch_size=batch_size,
            seed=seed + 1,
            stage="dam_frozen",
            save_steps=save_steps,
            resume=resume,
        )
    kept = model.base_model.dam_density(length).mean().item()  # pattern ∩ frozen mask, of all pairs
    return {"search_steps": searched, "train_steps": max(steps - searched, 0), "sparsity": 1.0 - kept}
