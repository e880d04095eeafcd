"""Small English→<lang> translation on the offline gettext corpus: the pieces of
:mod:`hf_sparse.translation_sparsefinder` (corpus, tokenizer, model config, batches, decoding, BLEU/chrF).

A run is: real UI-message pairs from the machine's gettext catalogues (:func:`hf_sparse.data.gettext_pairs`) →
one joint SentencePiece-style BPE tokenizer (`tokenizers`, no download) → a small entmax Marian trained with
``Seq2SeqTrainer`` → Sparsefinder predictors fitted on its decoder self-attention → BLEU/chrF with full entmax
and with predicted-sparse decoder attention.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerFast

from .configuration_entmax_marian import EntmaxSparsefinderMarianConfig
from .data import gettext_pairs

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"


@dataclass
class ParallelCorpus:
    """(source, target) pairs: ``train`` for the model (and the predictors), ``dev`` and ``test`` held out."""

    train: list[tuple[str, str]]
    dev: list[tuple[str, str]]
    test: list[tuple[str, str]]


def gettext_parallel_corpus(
    lang: str = "de", min_words: int = 3, max_words: int = 20, dev_size: int = 500, test_size: int = 500, seed: int = 0
) -> ParallelCorpus:
    """English→``lang`` pairs whose both sides have ``min_words..max_words`` words, shuffled with ``seed``.

    Sources are unique (the catalogues are deduplicated by source), so held-out sources never occur in training.
    """
    pairs = [
        (src, tgt)
        for src, tgt in gettext_pairs(lang)
        if min_words <= len(src.split()) <= max_words and min_words <= len(tgt.split()) <= max_words
    ]
    random.Random(seed).shuffle(pairs)
    held = dev_size + test_size
    if len(pairs) <= held:
        raise ValueError(f"only {len(pairs)} pairs of {min_words}..{max_words} words; cannot hold out {held}")
    return ParallelCorpus(train=pairs[held:], dev=pairs[:dev_size], test=pairs[dev_size:held])


def train_bpe_tokenizer(texts: list[str], vocab_size: int = 8000) -> PreTrainedTokenizerFast:
    """A joint, cased, SentencePiece-style BPE tokenizer (Metaspace ``▁`` word boundaries, NFKC) trained on ``texts``.

    Unlike the lowercasing BERT WordPiece tokenizer of :func:`hf_sparse.data.train_wordpiece_tokenizer`, it keeps
    case and decodes losslessly (no spaces inserted around punctuation), so BLEU/chrF compare real German text.
    Special tokens as Marian: ``<pad>`` = 0 (also the decoder start), ``</s>`` = 1 (appended to every sequence),
    ``<unk>`` = 2.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE(unk_token=UNK))
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD, EOS, UNK], show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A $B {EOS}", special_tokens=[(EOS, backend.token_to_id(EOS))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def small_marian_config(
    tokenizer, d_model: int = 128, sparsefinder: dict | None = None, **overrides
) -> EntmaxSparsefinderMarianConfig:
    """A Marian small enough to train on two CPU cores in minutes: 3+3 layers, 4 heads, FFN ``4 * d_model``, shared
    (tied) embeddings, 64 positions; entmax-1.5 decoder self-attention, softmax encoder and cross attention.
    """
    settings = dict(
        vocab_size=len(tokenizer),
        decoder_vocab_size=len(tokenizer),
        d_model=d_model,
        encoder_layers=3,
        decoder_layers=3,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model,
        max_position_embeddings=64,
        scale_embedding=True,
        dropout=0.1,
        share_encoder_decoder_embeddings=True,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        decoder_attention_fn="entmax15",
        encoder_attention_fn="softmax",
        cross_attention_fn="softmax",
        sparsefinder=sparsefinder,
    )
    return EntmaxSparsefinderMarianConfig(**{**settings, **overrides})


def encode_pairs(tokenizer, pairs: list[tuple[str, str]], max_length: int = 64) -> list[dict[str, list[int]]]:
    """Training examples: ``input_ids``, ``attention_mask`` and ``labels`` (target ids ending in ``</s>``)."""
    sources, targets = [s for s, _ in pairs], [t for _, t in pairs]
    enc = tokenizer(sources, text_target=targets, truncation=True, max_length=max_length)
    return [{key: enc[key][i] for key in ("input_ids", "attention_mask", "labels")} for i in range(len(pairs))]


def teacher_forced_batches(
    model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 32, max_length: int = 64
) -> list[dict[str, torch.Tensor]]:
    """Batches for fitting and measuring predictors: the model reads the reference translation (teacher forcing).

    Each batch has ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (``labels`` shifted right behind the
    decoder start) and ``decoder_attention_mask`` (its real positions), so padded decoder keys are not pairs.
    Pairs are sorted by target length first, to keep padding small.
    """
    examples = sorted(encode_pairs(tokenizer, pairs, max_length), key=lambda e: len(e["labels"]))
    collator = DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100, return_tensors="pt")
    batches = []
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size])
        batch["decoder_attention_mask"] = (batch.pop("labels") != -100).long()
        batches.append(dict(batch))
    return batches


@torch.no_grad()
def translate(
    model,
    tokenizer,
    sources: list[str],
    batch_size: int = 64,
    num_beams: int = 1,
    max_length: int = 64,
    desc: str = "translating",
) -> list[str]:
    """Generated translations of ``sources`` (batched by length, returned in the input order), with a progress bar."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc=desc):
            idx = order[start : start + batch_size]
            enc = tokenizer(
                [sources[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_length
            ).to(model.device)
            generated = model.generate(**enc, num_beams=num_beams, do_sample=False, max_length=max_length)
            for i, text in zip(idx, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                out[i] = text
    finally:
        model.train(was_training)
    return out


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacreBLEU defaults: 13a tokenization, cased)."""
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


__all__ = [
    "ParallelCorpus",
    "bleu_chrf",
    "encode_pairs",
    "gettext_parallel_corpus",
    "small_marian_config",
    "teacher_forced_batches",
    "train_bpe_tokenizer",
    "translate",
]
