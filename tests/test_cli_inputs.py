"""Inputs the command line must refuse in one line before any work: patterns, labels, data files, splits, cards,
run records. Every test here is fast: tiny files, and no training where the refusal comes first."""

import json
import os

import pytest

import hf_sparse_cli
from hf_sparse import cli
from hf_sparse.data import load_text_dataset


def _lines(path, texts) -> str:
    path.write_text("".join(f"{t}\n" for t in texts))
    return str(path)


def _texts(n: int, prefix: str = "message") -> list[str]:
    return [f"{prefix} number {i} about the disk" for i in range(n)]


def _fails(argv: list[str], capsys=None) -> str:
    """The one-line error ``cli.main(argv)`` ends with (exit status 1 or 2)."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    message = capsys.readouterr().err if info.value.code == 2 else str(info.value.code)
    assert message.strip() and message.strip().count("\n") == 0, message
    return message


# -- a 'learned' pattern needs a checkpoint's DAM mask ----------------------------------------------------------


@pytest.mark.parametrize(
    "command, extra, instead",
    [
        ("demo", [], "learn a mask with 'hf-sparse dam'"),
        ("dam", [], "this command learns the mask"),
        ("finetune", ["--runs", "dense", "pattern"], "the 'dam' run learns a mask"),
    ],
)
def test_a_learned_pattern_is_refused_before_any_data_is_read(tmp_path, monkeypatch, capsys, command, extra, instead):
    import hf_sparse.data

    def never(*args, **kwargs):
        raise AssertionError("data was read")

    monkeypatch.setattr(hf_sparse.data, "load_text_dataset", never)
    train = _lines(tmp_path / "t.txt", _texts(20))
    argv = [command, *extra, "--pattern", "window:2&learned", "--train-file", train]
    argv += ["--output-dir", str(tmp_path / "o")]
    message = _fails(argv, capsys)
    assert f"hf-sparse {command}: --pattern 'window:2&learned': 'learned' is a DAM mask" in message
    assert instead in message
    assert not (tmp_path / "o").exists()


def test_run_finetune_refuses_a_learned_pattern_before_loading_anything():
    from hf_sparse.finetune import run_finetune

    with pytest.raises(ValueError, match="'learned' is a DAM mask stored in a checkpoint"):
        run_finetune("no-such-model", None, runs=("pattern",), pattern="learned")


# -- classification needs two classes ---------------------------------------------------------------------------


def test_finetune_refuses_labels_of_a_single_class_instead_of_training_a_regression(tmp_path, capsys):
    rows = ["text,label", *(f"{t},only" for t in _texts(12))]
    (tmp_path / "one.csv").write_text("\n".join(rows) + "\n")
    argv = ["finetune", "--runs", "dense", "--steps", "1", "--batch-size", "2", "--max-length", "16"]
    message = _fails([*argv, "--train-file", str(tmp_path / "one.csv"), "--output-dir", str(tmp_path / "o")], capsys)
    assert message.startswith(
        "hf-sparse finetune: label column 'label': classification needs at least 2 classes, found 1: 'only'"
    )
    assert not (tmp_path / "o").exists()


def test_a_classifier_head_for_one_label_is_refused():
    from hf_sparse.finetune import load_classifier

    with pytest.raises(ValueError, match="labels: classification needs at least 2 classes, found 1: 'yes'"):
        load_classifier("no-such-model", ["yes"])


# -- empty data -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["txt", "csv", "jsonl"])
def test_an_empty_data_file_is_named_in_one_line(tmp_path, capsys, kind):
    (tmp_path / f"empty.{kind}").write_text("")
    message = _fails(["demo", "--train-file", str(tmp_path / f"empty.{kind}"), "--output-dir", str(tmp_path / "o")])
    assert message.startswith(f"hf-sparse demo: data file '{tmp_path / f'empty.{kind}'}' is empty")
    assert not (tmp_path / "o").exists()


def test_data_files_without_rows_or_unreadable_are_named(tmp_path):
    train = tmp_path / "train.csv"
    train.write_text("text\n" + "".join(f"{t}\n" for t in _texts(10)))
    (tmp_path / "header.csv").write_text("text\n")
    with pytest.raises(ValueError, match=r"data file '.*header.csv' holds no rows"):
        load_text_dataset(train_file=str(tmp_path / "header.csv"))
    with pytest.raises(ValueError, match=r"data file '.*header.csv' holds no rows"):
        load_text_dataset(train_file=str(train), validation_file=str(tmp_path / "header.csv"))
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{bad\n')
    with pytest.raises(ValueError, match=r"data file '.*bad.jsonl' cannot be read as json: "):
        load_text_dataset(train_file=str(tmp_path / "bad.jsonl"))


# -- a text in every row ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["demo", "finetune"])
def test_empty_cells_of_the_text_column_are_named_with_their_rows_before_any_work(tmp_path, command):
    rows = ["body,label", *(f"{t},{'ab'[i % 2]}" for i, t in enumerate(_texts(12))), ",a", "more text,b", ",b"]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    argv = [command, "--train-file", str(tmp_path / "t.csv"), "--text-column", "body", "--steps", "1"]
    message = _fails([*argv, "--output-dir", str(tmp_path / "o")])
    assert message.startswith(
        f"hf-sparse {command}: train data: rows [12, 14] (2 of 15) have a missing (an empty cell) or non-text 'body' "
        "(first: None); every example needs a text"
    )
    assert not (tmp_path / "o").exists()


def test_blank_texts_pass_the_check_as_masked_lm_packing_skips_them(tmp_path):
    import datasets

    texts = ["", *_texts(6), " ", *_texts(3, "other")]  # as wikitext: blank rows between paragraphs
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "wiki"))
    data = load_text_dataset(str(tmp_path / "wiki"), text_columns=("text",), validation_size=2)
    assert sorted([*data["train"]["text"], *data["validation"]["text"]]) == sorted(texts)
    train = _lines(tmp_path / "t.txt", texts)
    assert len(load_text_dataset(train_file=train, text_columns=("text",), validation_size=2)["train"]) == 9


def test_numbers_or_mixed_values_in_a_text_column_are_refused_and_other_columns_are_not_checked(tmp_path):
    mixed = _lines(tmp_path / "mixed.jsonl", [json.dumps({"text": t, "label": None}) for t in ["a b", 5, "c d", "e"]])
    data = load_text_dataset(train_file=mixed, columns=("label",), text_columns=(), validation_size=1)
    assert len(data["train"]) == 3  # unchecked without text_columns, as before
    with pytest.raises(ValueError, match=r"train data: rows \[1\] \(1 of 4\) have a missing .* or non-text 'text' "):
        load_text_dataset(train_file=mixed, text_columns=("text",))
    numbers = _lines(tmp_path / "n.csv", ["text", "5", "6"])
    with pytest.raises(ValueError, match=r"train data: rows \[0, 1\] \(2 of 2\) have a missing .* or non-text 'text' "):
        load_text_dataset(train_file=numbers, text_columns=("text",))


# -- evaluation on held-out data only ---------------------------------------------------------------------------


def _saved_dataset(folder, splits=("train", "validation")) -> str:
    import datasets

    datasets.DatasetDict(
        {name: datasets.Dataset.from_dict({"text": _texts(10 + 5 * i, name)}) for i, name in enumerate(splits)}
    ).save_to_disk(str(folder))
    return str(folder)


def test_validating_on_the_training_split_or_file_is_refused(tmp_path, monkeypatch):
    saved = _saved_dataset(tmp_path / "saved")
    argv = ["demo", "--dataset", saved, "--split", "validation", "--validation-split", "validation"]
    message = _fails([*argv, "--output-dir", str(tmp_path / "o")])
    assert message.startswith(
        "hf-sparse demo: validation split 'validation' is also the training split: validation data must be held out"
    )
    train = _lines(tmp_path / "train.txt", _texts(10))
    monkeypatch.chdir(tmp_path)  # the same file under another name
    message = _fails(["demo", "--train-file", train, "--validation-file", "./train.txt", "--output-dir", "o"])
    assert message.startswith("hf-sparse demo: validation file './train.txt' is also the training file: validation")
    assert not (tmp_path / "o").exists()
    valid = _lines(tmp_path / "valid.txt", _texts(5, "other"))
    with pytest.raises(ValueError, match="test file 'valid.txt' is also the validation file: test data must be held"):
        load_text_dataset(train_file=train, validation_file=valid, test_file="valid.txt")


def test_a_datasets_own_validation_split_is_used_by_default_and_the_data_line_says_which(
    tmp_path, monkeypatch, capsys
):
    def stop(*args, **kwargs):
        raise ValueError("stopped after reading the data")

    monkeypatch.setattr(cli, "_mlm_corpus", stop)
    own = _saved_dataset(tmp_path / "own")  # train: 10 rows, validation: 15
    _fails(["demo", "--dataset", own, "--output-dir", str(tmp_path / "a")])
    assert "data: 10 training / 15 validation examples (validation: split 'validation')" in capsys.readouterr().out
    data = load_text_dataset(own)
    assert list(data["validation"]["text"]) == _texts(15, "validation") and len(data["train"]) == 10
    only_train = _saved_dataset(tmp_path / "only_train", splits=("train", "test"))  # no validation split
    _fails(["demo", "--dataset", only_train, "--validation-size", "0.2", "--output-dir", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert "data: 8 training / 2 validation examples (validation: 20 % of the training split, held out)" in out
    # a named split still wins, and training on the validation split holds part of it out
    assert len(load_text_dataset(own, split="validation", validation_size=0.2)["validation"]) == 3
    data = load_text_dataset(_saved_dataset(tmp_path / "three", ("train", "validation", "dev")), validation_split="dev")
    assert list(data["validation"]["text"]) == _texts(20, "dev")


# -- the card command reads a local checkpoint --------------------------------------------------------------------


def test_the_card_command_names_a_missing_folder_a_folder_without_config_and_bad_metrics(tmp_path, capsys):
    from conftest import tiny_kwargs
    from hf_sparse import SparseBertConfig, SparseBertForMaskedLM

    message = _fails(["card", str(tmp_path / "nowhere")], capsys)  # never taken for a Hub id
    assert message.startswith(f"hf-sparse card: {tmp_path / 'nowhere'}: no such folder (the card command reads")
    (tmp_path / "empty").mkdir()
    message = _fails(["card", str(tmp_path / "empty")], capsys)
    assert message.startswith(f"hf-sparse card: {tmp_path / 'empty'}: the folder holds no config.json")
    SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs())).save_pretrained(tmp_path / "ours")
    for text, words in (("[1, 2]", "holds a JSON list, not an object of metric name -> value"), ("{bad", "not valid")):
        (tmp_path / "m.json").write_text(text)
        message = _fails(["card", str(tmp_path / "ours"), "--metrics", str(tmp_path / "m.json")], capsys)
        assert message.startswith(f"hf-sparse card: metrics file {tmp_path / 'm.json'}") and words in message
    assert not (tmp_path / "ours" / "README.md").exists()


# -- --dataset: a folder or a Hub name -------------------------------------------------------------------------------


def test_a_dataset_that_is_a_file_or_a_missing_local_path_is_said_before_any_hub_lookup(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _lines(tmp_path / "train.csv", ["text", *_texts(4)])
    for dataset, words in (
        ("train.csv", "--dataset train.csv: a file: use --train-file"),
        ("./my_data", "--dataset ./my_data: no such folder"),
        ("data/my/set", "--dataset data/my/set: no such folder"),
        (str(tmp_path / "gone"), f"--dataset {tmp_path / 'gone'}: no such folder"),
    ):
        message = _fails(["demo", "--dataset", dataset, "--output-dir", "o"], capsys)
        assert message.startswith(f"hf-sparse demo: {words}"), message
    parser = hf_sparse_cli.build_parser()
    for hub_name in ("org/name", "name"):  # may be Hub names: left to `datasets`
        hf_sparse_cli.check_arguments(parser, parser.parse_args(["demo", "--dataset", hub_name, "--output-dir", "o"]))
    assert not (tmp_path / "o").exists()


# -- run.json ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, why", [("", "JSONDecodeError"), ('{"command": "de', "JSONDecodeError"), ("[]", "not")])
def test_resuming_from_an_unreadable_run_record_says_so_in_one_line(tmp_path, capsys, text, why):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "run.json").write_text(text)
    message = _fails(["demo", "--steps", "1", "--resume", "--output-dir", str(tmp_path / "o")], capsys)
    assert message.startswith(f"hf-sparse demo: --resume: {tmp_path / 'o' / 'run.json'} is unreadable ({why}")
    assert "so the run there cannot be continued: start it again with --overwrite" in message


def test_a_run_record_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    import argparse

    record = {"command": "demo", "options": {"steps": 1}}
    (tmp_path / "run.json").write_text(json.dumps(record))
    real_dump = json.dump

    def dump_then_die(obj, handle, **kwargs):
        handle.write('{"command": "de')  # half a record, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        hf_sparse_cli._finish_record(argparse.Namespace(command="demo", output_dir=str(tmp_path)))
    assert json.loads((tmp_path / "run.json").read_text()) == record and os.listdir(tmp_path) == ["run.json"]
    monkeypatch.setattr(json, "dump", real_dump)
    hf_sparse_cli._finish_record(argparse.Namespace(command="demo", output_dir=str(tmp_path)))
    assert json.loads((tmp_path / "run.json").read_text()) == {**record, "finished": True}


# -- --help ----------------------------------------------------------------------------------------------------------


def test_help_shows_a_default_of_zero_but_not_the_false_of_a_flag():
    parser = hf_sparse_cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("demo", "dam", "finetune", "sparsefinder"):
        text = " ".join(commands[name].format_help().split())
        assert "initialisation (default: 0)" in text, name
        assert "(default: False)" not in text and "(default: None)" not in text, name


@pytest.mark.parametrize(
    "argv, words",
    [
        (["sparsefinder", "--steps", "5"], "--steps is for --task translation (this run is --task mlm)"),
        (["sparsefinder", "--task", "translation", "--fit-blocks", "8"], "--fit-blocks is for --task mlm"),
        (["sparsefinder", "--dev-size", "8"], "--dev-size is for --task translation"),
    ],
)
def test_an_option_of_the_other_sparsefinder_task_is_refused_not_ignored(argv, words, capsys, tmp_path):
    """`sparsefinder --steps` on the default mlm task once printed 'pre-training ... for 200 steps' and ignored it."""
    assert words in _fails([*argv, "--output-dir", str(tmp_path / "o")], capsys)
