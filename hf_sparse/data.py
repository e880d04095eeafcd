"""Text for the commands: the user's own data through `datasets`, or, offline by default, the gettext catalogues
every Debian/Ubuntu machine carries.

``/usr/share/locale/<lang>/LC_MESSAGES/*.mo`` hold tens of thousands of real English UI messages with their
translations. They are read at run time (never copied into this repository) and give demos and tests a real,
offline corpus: English sentences for masked language modelling, English→<lang> pairs for translation. The
folder can be pointed elsewhere (``locale_dir``, ``--locale-dir``) for machines that keep catalogues elsewhere.

Whatever the source, a command receives a ``datasets.DatasetDict`` with ``train`` and ``validation`` splits
(:func:`load_text_dataset`; translation also keeps the data's own ``test`` split), and tokenises it with
``Dataset.map`` (batched; cached on disk for file-backed data).
"""

from __future__ import annotations

import gettext
import glob
import logging
import os
import random
from collections import Counter

LOCALE_DIR = "/usr/share/locale"
logger = logging.getLogger(__name__)


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


def english_sentences(
    lang: str = "de", max_sentences: int | None = None, seed: int = 0, locale_dir: str = LOCALE_DIR
) -> list[str]:
    """The English side of :func:`gettext_pairs`, shuffled with ``seed``."""
    sentences = [source for source, _ in gettext_pairs(lang, locale_dir)]
    random.Random(seed).shuffle(sentences)
    return sentences[:max_sentences] if max_sentences else sentences


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int = 2000, limit_alphabet: int = 1000):
    """A BERT tokenizer trained on ``texts`` (no download): WordPiece vocabulary from the `tokenizers` library, the
    same in every process and run.

    The library's trainer alone is not reproducible: it numbers the word-internal ``##`` characters in hash order,
    and those numbers break ties between equally frequent merges, so two runs on the same texts learn different
    vocabularies (tokenizers issue #1794). Here those characters are numbered first, in sorted order (given as
    reserved tokens, which the trainer numbers before anything else); the vocabulary is otherwise the library's.
    The main process trains and the others receive its vocabulary under ``accelerate launch``.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    state = PartialState(cpu=not torch.cuda.is_available())  # as TrainingArguments(use_cpu=...) will set it up
    vocab = None
    if state.is_main_process:
        trainer = BertWordPieceTokenizer(lowercase=True)
        normalizer, pre_tokenizer = trainer.normalizer, trainer.pre_tokenizer
        counts, inside = Counter(), set()
        for text in texts:
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
                counts.update(word)
                inside.update(word[1:])
        # the trainer's alphabet: the limit_alphabet most frequent characters (ties by character here)
        alphabet = set(sorted(counts, key=lambda c: (-counts[c], c))[:limit_alphabet])
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        trainer.train_from_iterator(
            texts,
            vocab_size=vocab_size,
            min_frequency=2,
            limit_alphabet=limit_alphabet,
            special_tokens=special + ["##" + c for c in sorted(inside & alphabet)],
            show_progress=False,
        )
        vocab = trainer.get_vocab()
    if state.num_processes > 1:
        vocab = broadcast_object_list([vocab], from_process=0)[0]
    return BertTokenizer(vocab=vocab)


def english_corpus(
    lang: str = "de",
    max_sentences: int | None = None,
    validation_sentences: int = 2000,
    seed: int = 0,
    locale_dir: str = LOCALE_DIR,
):
    """The offline default corpus as a ``DatasetDict``: shuffled English messages (column ``text``), the first
    ``validation_sentences`` held out as ``validation`` (a split by message, so no held-out text is trained on)."""
    from datasets import Dataset, DatasetDict

    sentences = english_sentences(lang, max_sentences=max_sentences, seed=seed, locale_dir=locale_dir)
    if len(sentences) <= validation_sentences:
        raise ValueError(
            f"{len(sentences)} messages cannot hold out {validation_sentences} for validation: lower the held-out "
            "count or use more messages"
        )
    return DatasetDict(
        train=Dataset.from_dict({"text": sentences[validation_sentences:]}),
        validation=Dataset.from_dict({"text": sentences[:validation_sentences]}),
    )


DATA_FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _builder_for(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension not in DATA_FILE_BUILDERS:
        raise ValueError(
            f"data file {path!r}: unknown extension {extension or '(none)'!r}; valid: {', '.join(DATA_FILE_BUILDERS)}"
        )
    if not os.path.isfile(path):
        raise ValueError(f"data file {path!r} does not exist")
    if os.path.getsize(path) == 0:  # `datasets` would fail to infer a schema, in a traceback
        raise ValueError(f"data file {path!r} is empty")
    return DATA_FILE_BUILDERS[extension]


def _check_texts(part, name: str, column: str) -> None:
    """Every row of ``column`` holds a string, or an error naming the first bad rows (counted from 0, as read): an
    empty CSV cell (read as None) or a number would fail far from its cause, in a tokenizer. Blank strings pass
    (masked-LM packing skips them; datasets such as wikitext are full of them). Arrow counts the missing values, so
    a large dataset is checked in moments."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = part.with_format("arrow")[column]
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        bad = pc.indices_nonzero(pc.is_null(values)).to_pylist() if values.null_count else []
        first = None
    else:  # numbers, nulls only, or a mixed JSON column: row by row, as Python values
        values = part[column]
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        first = values[bad[0]] if bad else None
    if bad:
        raise ValueError(
            f"{name} data: rows {bad[:5]}{' ...' if len(bad) > 5 else ''} ({len(bad)} of {len(values)}) have a "
            f"missing (an empty cell) or non-text {column!r} (first: {first!r}); every example needs a text"
        )


def _unreadable(builder: str, files: dict[str, str], error: Exception) -> str:
    """Which data file `datasets` could not read, and why, in one line (its own error names neither the file nor,
    for a file of no rows, the cause: 'Instruction "train" corresponds to no data!')."""
    import datasets

    for name, path in files.items():
        try:
            datasets.load_dataset(builder, data_files={name: path})
        except (datasets.exceptions.DatasetGenerationError, ValueError) as alone:
            error = alone
            break
    else:
        path = ", ".join(files.values())
    if "corresponds to no data" in str(error):
        return f"data file {path!r} holds no rows (a header alone, or blank lines)"
    cause = error.__cause__ or error
    return f"data file {path!r} cannot be read as {builder}: {type(cause).__name__}: {cause}"


def load_text_dataset(
    dataset: str | None = None,
    dataset_config: str | None = None,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    split: str = "train",
    validation_split: str | None = None,
    test_split: str | None = None,
    test_split_optional: bool = False,
    validation_size: float | int = 0.1,
    columns: tuple[str, ...] = ("text",),
    text_columns: tuple[str, ...] = (),
    max_train: int | None = None,
    max_validation: int | None = None,
    seed: int = 0,
):
    """The user's data as a ``DatasetDict`` with ``train`` and ``validation`` splits (and ``test`` when asked for)
    holding ``columns``.

    Sources, as in Transformers' example scripts: ``train_file``/``validation_file``/``test_file`` (txt: one text
    per line in column ``text``; json/jsonl/csv/parquet), or ``dataset``: a folder written by
    ``save_to_disk``, a local dataset folder or script, or a Hub dataset name (with ``dataset_config``; the Hub is
    reached only if the dataset is not cached). ``split`` is read for training; ``validation_split`` (or
    ``validation_file``) for validation, by default the dataset's own ``validation`` split (as in Transformers'
    example scripts), else ``validation_size`` (a fraction or a count) of the training split is held out with
    ``seed``. Which one was used is logged with the sizes.

    ``test_split`` (or ``test_file``) is returned as ``test``: translation measures its final numbers on the
    dataset's own test pairs, as published results do, rather than on pairs carved out of validation. A named
    split the dataset lacks is an error, unless ``test_split_optional`` (how the translation command reads the
    default ``"test"``): then no ``test`` is returned. Without these, no ``test`` is returned (the other commands
    see train and validation only). Missing columns are an error that lists the columns present; so is a missing
    (None) or non-text value in one of ``text_columns`` (a tokenizer would fail on it later, far from the cause).
    """
    import datasets

    if (dataset is None) == (train_file is None):
        raise ValueError("give exactly one data source: a dataset (name or local path) or a train file")
    test = None
    if train_file is not None:
        if test_split is not None and not test_split_optional:
            raise ValueError(f"test split {test_split!r} is a split of a dataset; with a train file, give a test file")
        builder = _builder_for(train_file)
        files = {"train": train_file}
        for name, path in (("validation", validation_file), ("test", test_file)):
            if path is not None:
                if _builder_for(path) != builder:
                    raise ValueError(f"train file {train_file!r} and {name} file {path!r} differ in type")
                same = [other for other, known in files.items() if os.path.samefile(path, known)]
                if same:  # numbers measured on training data would be reported as held-out ones
                    raise ValueError(
                        f"{name} file {path!r} is also the {'training' if same[0] == 'train' else same[0]} file: "
                        f"{name} data must be held out from {'training' if name == 'validation' else 'both'}"
                    )
                files[name] = path
        try:
            loaded = datasets.load_dataset(builder, data_files=files)
        except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
            raise ValueError(_unreadable(builder, files, error)) from error
        train = loaded["train"]
        validation = loaded["validation"] if validation_file is not None else None
        test = loaded["test"] if test_file is not None else None
    else:
        if validation_file is not None or test_file is not None:
            raise ValueError("validation and test files go with a train file; with a dataset, name its splits")
        saved = os.path.isdir(dataset) and any(
            os.path.exists(os.path.join(dataset, name)) for name in ("dataset_dict.json", "state.json")
        )
        loaded = datasets.load_from_disk(dataset) if saved else datasets.load_dataset(dataset, dataset_config)
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict(train=loaded)
        if validation_split is None and split != "validation" and "validation" in loaded:
            validation_split = "validation"  # the dataset's own, as Transformers' example scripts take it
        if test_split_optional and (test_split not in loaded or test_split in (split, validation_split)):
            test_split = None  # an optional default never turns into an error
        for wanted in (split, validation_split, test_split):
            if wanted is not None and wanted not in loaded:
                raise ValueError(f"dataset {dataset!r} has no split {wanted!r}; splits: {', '.join(loaded)}")
        if validation_split is not None and validation_split == split:
            raise ValueError(
                f"validation split {validation_split!r} is also the training split: validation data must be held "
                "out from training (name another split, or none to hold out part of the training split)"
            )
        if test_split is not None and test_split in (split, validation_split):
            raise ValueError(
                f"test split {test_split!r} is also the {'training' if test_split == split else 'validation'} split: "
                "test pairs must be held out from both"
            )
        train = loaded[split]
        validation = loaded[validation_split] if validation_split is not None else None
        test = loaded[test_split] if test_split is not None else None
    # checked as read, before a validation split is carved out: row numbers count the source's rows
    for name, part in (("train", train), ("validation", validation), ("test", test)):
        if part is None:
            continue
        missing = [column for column in columns if column not in part.column_names]
        if missing:
            raise ValueError(
                f"{name} data has no column {', '.join(map(repr, missing))}; columns present: "
                f"{', '.join(part.column_names)} (choose them with the column options)"
            )
        for column in text_columns:
            _check_texts(part, name, column)
    if validation_file is not None:
        origin = f"file {validation_file}"
    elif validation_split is not None:
        origin = f"split {validation_split!r}"
    elif validation_size < 1:
        origin = f"{100 * validation_size:g} % of the training {'file' if train_file else 'split'}, held out"
    else:
        origin = f"{validation_size} examples of the training {'file' if train_file else 'split'}, held out"
    if validation is None:
        if not (0 < validation_size < 1 or (isinstance(validation_size, int) and 0 < validation_size < len(train))):
            raise ValueError(
                f"validation_size {validation_size!r}: a fraction in (0, 1) or a count below the {len(train)} "
                "training examples"
            )
        parts = train.train_test_split(test_size=validation_size, seed=seed)
        train, validation = parts["train"], parts["test"]
    splits = {"train": train, "validation": validation, **({"test": test} if test is not None else {})}
    if max_train is not None:
        splits["train"] = train.select(range(min(max_train, len(train))))
    if max_validation is not None:
        splits["validation"] = validation.select(range(min(max_validation, len(validation))))
    counts = " / ".join(f"{len(part)} {'training' if name == 'train' else name}" for name, part in splits.items())
    logger.info(f"data: {counts} examples (validation: {origin})")
    return datasets.DatasetDict(splits)


def pack_into_blocks(dataset, tokenizer, text_column: str = "text", block_size: int = 128):
    """BERT-style pre-training examples from a ``Dataset`` of texts: tokenised, joined with [SEP], cut into
    ``[CLS] … [SEP]`` blocks (``Dataset.map``, batched; the tail of each 1,000-text batch that does not fill a block
    is dropped, as in Transformers' ``run_mlm.py``).

    Short UI messages become full-length sequences, so sparse patterns act on real long-range structure.
    """
    body = block_size - 2
    if body < 1:
        raise ValueError(f"block_size {block_size} leaves no room between [CLS] and [SEP]: use at least 3")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id

    def pack(batch: dict) -> dict:
        stream: list[int] = []
        for text, ids in zip(batch[text_column], tokenizer(batch[text_column], add_special_tokens=False)["input_ids"]):
            if text and ids:
                stream.extend(ids)
                stream.append(sep)
        starts = range(0, len(stream) - body + 1, body)
        return {"input_ids": [[cls, *stream[start : start + body], sep] for start in starts]}

    return dataset.map(
        pack, batched=True, batch_size=1000, remove_columns=dataset.column_names, desc=f"packing {block_size}-blocks"
    )


def gettext_domain_task(
    lang: str = "de",
    locale_dir: str = LOCALE_DIR,
    num_labels: int = 4,
    max_per_label: int | None = 1000,
    validation_fraction: float = 0.2,
    seed: int = 0,
    domains: list[str] | None = None,
):
    """An offline text-classification task from real data: which program's gettext catalogue an English UI
    message comes from (``git``, ``postgres-15``, ``gnupg2``, ...), as a ``DatasetDict`` with ``train`` and
    ``validation`` splits, columns ``text`` and ``label`` (a ``ClassLabel`` holding the catalogue names).

    Why this task: every Debian/Ubuntu machine has it, its texts are real and short, and the labels need
    understanding the message (version-control vs database vs cryptography vocabulary), so a fine-tuned BERT beats
    chance by a wide margin but not trivially. Messages found in more than one catalogue of ``lang`` are dropped
    (their label would be ambiguous), and so are the ``iso_*`` code lists (country and language names, not UI
    messages). Without ``domains``, the ``num_labels`` catalogues with the most remaining messages are chosen.
    Every label gets the same number of messages (the smallest chosen catalogue's count, at most
    ``max_per_label``), drawn with ``seed``; each label's ``validation_fraction`` is held out, so both splits are
    balanced and no text is in both.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2 (a classification task), got {num_labels!r}")
    if max_per_label is not None and (not isinstance(max_per_label, int) or max_per_label < 2):
        raise ValueError(f"max_per_label must be None or an integer >= 2, got {max_per_label!r}")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    files = sorted(glob.glob(os.path.join(locale_dir, lang, "LC_MESSAGES", "*.mo")))
    if not files:
        gettext_pairs(lang, locale_dir)  # raises, listing the languages present
    owners: dict[str, set[str]] = {}
    for path in files:
        domain = os.path.basename(path)[: -len(".mo")]
        if domain.startswith("iso_") or domain.startswith("iso-"):
            continue
        try:
            with open(path, "rb") as handle:
                catalog = gettext.GNUTranslations(handle)._catalog
        except (OSError, UnicodeDecodeError, LookupError):
            continue  # a damaged or oddly encoded catalogue is skipped, as in gettext_pairs
        for source in catalog:
            if isinstance(source, str) and "\x04" not in source and (text := _clean(source)):
                owners.setdefault(text, set()).add(domain)
    by_domain: dict[str, list[str]] = {}
    for text, owned_by in owners.items():
        if len(owned_by) == 1:
            by_domain.setdefault(next(iter(owned_by)), []).append(text)
    ranked = sorted(by_domain, key=lambda d: (-len(by_domain[d]), d))
    if domains is None:
        if len(ranked) < num_labels:
            raise ValueError(
                f"only {len(ranked)} gettext catalogues for {lang!r} under {locale_dir} have messages of their own "
                f"({', '.join(ranked) or 'none'}); ask for fewer labels (num_labels={num_labels})"
            )
        chosen = sorted(ranked[:num_labels])
    else:
        unknown = [d for d in domains if d not in by_domain]
        if unknown or len(set(domains)) < 2:
            raise ValueError(
                f"domains {list(domains)!r}: give at least two distinct catalogues; unknown: {unknown}. Catalogues "
                f"with messages of their own, most first: {', '.join(ranked[:30])}"
            )
        chosen = sorted(set(domains))
    per_label = min(len(by_domain[d]) for d in chosen)
    if max_per_label is not None:
        per_label = min(per_label, max_per_label)
    held_out = max(1, round(per_label * validation_fraction))
    if per_label - held_out < 1:
        raise ValueError(f"{per_label} messages per label leave none to train on after holding out {held_out}")
    rng = random.Random(seed)
    splits: dict[str, dict[str, list]] = {"train": {"text": [], "label": []}, "validation": {"text": [], "label": []}}
    for label, domain in enumerate(chosen):
        texts = sorted(by_domain[domain])
        rng.shuffle(texts)
        for split, part in (("validation", texts[:held_out]), ("train", texts[held_out:per_label])):
            splits[split]["text"] += part
            splits[split]["label"] += [label] * len(part)
    features = Features({"text": Value("string"), "label": ClassLabel(names=chosen)})
    return DatasetDict(
        {name: Dataset.from_dict(columns, features=features).shuffle(seed=seed) for name, columns in splits.items()}
    )
