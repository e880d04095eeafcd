"""Small masked-LM pre-training on the offline corpus: the experiment behind ``hf-sparse demo`` and the
SparseBERT scripts (importance analysis, reproduction table), written once.

A run is: the English gettext messages → a WordPiece tokenizer trained on them → BERT-style packed blocks →
a small SparseBERT → ``Trainer`` with BERT's 15% masking → held-out masked-LM metrics on fixed masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

from .configuration_sparse_bert import SparseBertConfig
from .data import english_sentences, pack_into_blocks, train_wordpiece_tokenizer


@dataclass
class MLMCorpus:
    tokenizer: object
    train: list[dict]
    eval: list[dict]


def offline_mlm_corpus(
    lang: str = "de",
    max_sentences: int | None = None,
    eval_sentences: int = 2000,
    vocab_size: int = 4000,
    block_size: int = 128,
    seed: int = 0,
) -> MLMCorpus:
    """Held-out split by message (not by block), tokenizer trained on the training messages only."""
    sentences = english_sentences(lang, max_sentences=max_sentences, seed=seed)
    train_texts, eval_texts = sentences[eval_sentences:], sentences[:eval_sentences]
    tokenizer = train_wordpiece_tokenizer(train_texts, vocab_size=vocab_size)
    return MLMCorpus(
        tokenizer,
        pack_into_blocks(tokenizer, train_texts, block_size),
        pack_into_blocks(tokenizer, eval_texts, block_size),
    )


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
) -> Trainer:
    """Masked-LM training with Trainer (progress bar and loss logs every ``steps // 10`` steps)."""
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer"),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=max(steps // 10, 1),
        logging_steps=max(steps // 10, 1),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
    )
    if callable(optimizer_cls_and_kwargs):  # a factory (model, args) -> (cls, kwargs), e.g. DAMCallback's
        optimizer_cls_and_kwargs = optimizer_cls_and_kwargs(model, args)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=corpus.train,
        data_collator=DataCollatorForLanguageModeling(corpus.tokenizer, mlm_probability=0.15),
        callbacks=callbacks,
        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
    )
    trainer.train()
    return trainer
