"""Offline real text: the gettext catalogues every Debian/Ubuntu machine carries.

``/usr/share/locale/<lang>/LC_MESSAGES/*.mo`` hold tens of thousands of real English UI messages with their
translations. They are read at run time (never copied into this repository) and give demos and tests a real,
offline corpus: English sentences for masked language modelling, English→<lang> pairs for translation.
"""

from __future__ import annotations

import gettext
import glob
import os
import random

LOCALE_DIR = "/usr/share/locale"


def _clean(text: str) -> str | None:
    text = " ".join(text.split())
    if not 3 <= len(text) <= 200 or not any(c.isalpha() for c in text):
        return None
    return text


def gettext_pairs(
    lang: str = "de", locale_dir: str = LOCALE_DIR, max_pairs: int | None = None
) -> list[tuple[str, str]]:
    """English→``lang`` message pairs from every catalogue of ``lang``, deduplicated, in a fixed order."""
    files = sorted(glob.glob(os.path.join(locale_dir, lang, "LC_MESSAGES", "*.mo")))
    if not files:
        available = sorted(d for d in os.listdir(locale_dir)) if os.path.isdir(locale_dir) else []
        raise FileNotFoundError(
            f"no gettext catalogues for language {lang!r} under {locale_dir}; languages present: "
            f"{', '.join(available[:40]) or 'none (install a package that ships translations, e.g. gettext)'}"
        )
    pairs: dict[str, str] = {}
    for path in files:
        try:
            with open(path, "rb") as handle:
                catalog = gettext.GNUTranslations(handle)._catalog
        except (OSError, UnicodeDecodeError, LookupError):
            continue  # a damaged or oddly encoded catalogue is skipped, the rest still count
        for source, target in catalog.items():
            if not isinstance(source, str) or "\x04" in source:  # plural forms and message contexts
                continue
            source, target = _clean(source), _clean(target) if isinstance(target, str) else None
            if source and target and source != target:
                pairs.setdefault(source, target)
    items = sorted(pairs.items())
    return items[:max_pairs] if max_pairs else items


def english_sentences(lang: str = "de", max_sentences: int | None = None, seed: int = 0) -> list[str]:
    """The English side of :func:`gettext_pairs`, shuffled with ``seed``."""
    sentences = [source for source, _ in gettext_pairs(lang)]
    random.Random(seed).shuffle(sentences)
    return sentences[:max_sentences] if max_sentences else sentences


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int = 2000):
    """A BERT tokenizer trained on ``texts`` (no download): WordPiece vocabulary from the `tokenizers` library."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, show_progress=False)
    return BertTokenizer(vocab=trainer.get_vocab())


def pack_into_blocks(tokenizer, texts: list[str], block_size: int = 128) -> list[dict[str, list[int]]]:
    """BERT-style pre-training examples: texts tokenized, joined with [SEP], cut into ``[CLS] … [SEP]`` blocks.

    Short UI messages become full-length sequences, so sparse patterns act on real long-range structure.
    """
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(tokenizer.sep_token_id)
    body = block_size - 2
    return [
        {"input_ids": [tokenizer.cls_token_id, *stream[start : start + body], tokenizer.sep_token_id]}
        for start in range(0, len(stream) - body + 1, body)
    ]
