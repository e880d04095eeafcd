"""What a command-line user sees: model cards name the data actually evaluated on, errors name the flags typed,
--overwrite leaves one experiment's results, no unexplained intermediate folders, --resume judges files by path."""

import json

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
