import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForMaskedLM, BertForMaskedLM

import hf_sparse_cli
from conftest import tiny_bert_config, tiny_kwargs, tiny_tokenizer
from hf_sparse import SparseBertConfig, SparseBertForMaskedLM, cli
from hf_sparse.data import english_corpus, english_sentences, gettext_pairs, load_text_dataset
from hf_sparse.mlm import mlm_corpus


def test_gettext_pairs_are_real_english_to_german_messages():
    pairs = gettext_pairs("de")
    assert len(pairs) > 1000
    assert len({s for s, _ in pairs}) == len(pairs)  # deduplicated sources
    assert all(s != t and s.strip() == s and "\n" not in s for s, t in pairs[:500])
    assert pairs == gettext_pairs("de")  # a fixed order


def test_unknown_language_names_what_is_there():
    with pytest.raises(FileNotFoundError, match="no gettext catalogues for language 'xx-none'.*languages present"):
        gettext_pairs("xx-none")


def test_english_sentences_are_shuffled_reproducibly():
    assert english_sentences("de", 50, seed=1) == english_sentences("de", 50, seed=1)
    assert english_sentences("de", 50, seed=1) != english_sentences("de", 50, seed=2)


def test_patterns_command_prints_the_paper_sparsities_and_draws_heatmaps(tmp_path, capsys):
    png = tmp_path / "p.png"
    cli.main(["patterns", "--png", str(png)])
    out = capsys.readouterr().out
    assert "strided:4" in out and "70.39" in out and "96.13" in out
    assert png.stat().st_size > 10_000


def test_patterns_command_reports_a_bad_spec_and_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["patterns", "windw:3"])
    assert "unknown pattern 'windw'" in str(info.value.code)


def test_demo_trains_saves_and_reloads_through_remote_code(tmp_path, capsys):
    cli.main(["demo", "--steps", "4", "--train-sentences", "300", "--eval-sentences", "40", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "held-out masked-LM with pattern 'bigbird:3,1,2': accuracy" in out
    first = out.split("accuracy ")[1][:5]
    assert f"reloaded with AutoModelForMaskedLM: accuracy {first}" in out
    assert (tmp_path / "model" / "modeling_sparse_bert.py").exists()
    assert (tmp_path / "pattern.png").exists()


SMALL_CORPUS = ["--max-sentences", "400", "--eval-sentences", "50", "--max-length", "32"]


def test_dam_command_searches_freezes_saves_and_the_checkpoint_reloads_through_remote_code(tmp_path, capsys):
    cli.main(["dam", "--steps", "6", "--search-steps", "3", *SMALL_CORPUS, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "DAM (offset): searched 3 steps, mask sparsity" in out and "pattern now 'learned'" in out
    model_dir = tmp_path / "model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert f"mask sparsity {100 * metrics['mask_sparsity']:.1f} %" in out
    assert metrics["search_steps"] == 3 and metrics["frozen_mask_steps"] == 3
    card = (model_dir / "README.md").read_text()
    assert "frozen: the learned mask is stored in the checkpoint" in card
    assert (model_dir / "attention_masks.png").exists()
    model = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=True)
    assert model.config.attention_pattern == "learned"
    kept = model.base_model.dam.frozen(32).float().mean().item()
    assert abs((1 - kept) - metrics["mask_sparsity"]) < 1e-6


def test_sparsefinder_command_fits_sweeps_and_saves_fitted_predictors_with_a_card(tmp_path, capsys):
    args = ["sparsefinder", "--pretrain-steps", "3", "--entmax-steps", "2", "--epochs", "1"]
    cli.main([*args, "--fit-blocks", "8", "--eval-blocks", "8", *SMALL_CORPUS, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "softmax checkpoint: fine-tuning to 1.5-entmax attention for 2 steps" in out
    # the softmax model pre-trained on the way is not left behind as an unexplained checkpoint folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "pareto.csv", "pareto.png", "run.json"]
    metrics = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert f"recall {metrics['recall']:.3f}" in out and 0 <= metrics["graph_sparsity"] <= 1
    rows = (tmp_path / "pareto.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and rows[1].startswith("distance,threshold=0.5")  # the distance sweep
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert model.config.attention_fn == "entmax15" and model.config.sparsefinder["enabled"] is True
    assert all(bool(m.sparsefinder.fitted) for m in model.sparsefinder_modules().values())
    card = (tmp_path / "model" / "README.md").read_text()
    assert "layers [0, 1] (fitted: [0, 1])" in card and "(pareto.png)" in card
    assert not (tmp_path / "model" / "attention_masks.png").exists()  # dense pattern: nothing to draw


def test_sparsefinder_command_refuses_blocks_longer_than_the_model(tmp_path):
    SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(max_position_embeddings=16))).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["sparsefinder", "--model", str(tmp_path), "--max-length", "32", "--out", str(tmp_path / "o")])
    assert f"--max-length 32 exceeds {tmp_path}'s max_position_embeddings 16" in str(info.value.code)
    assert not (tmp_path / "o").exists()  # the failed run leaves no empty output folder


def test_card_command_writes_a_card_and_refuses_a_checkpoint_that_is_not_ours(tmp_path, capsys):
    model = SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs(attention_pattern="strided:4")))
    model.save_pretrained(tmp_path / "ours")
    (tmp_path / "m.json").write_text(json.dumps({"accuracy": 0.5}))
    (tmp_path / "curve.png").write_bytes(b"\x89PNG not really")
    cli.main(
        ["card", str(tmp_path / "ours"), "--metrics", str(tmp_path / "m.json"), "--repo-id", "org/strided"]
        + ["--plot", str(tmp_path / "curve.png"), "--description", "Made by a test.", "--out", str(tmp_path / "c")]
    )
    card = (tmp_path / "c" / "README.md").read_text()
    assert "org/strided" in card and "| accuracy | 0.5 |" in card and "`strided:4`" in card
    assert "Made by a test." in card and "![curve](curve.png)" in card and (tmp_path / "c" / "curve.png").exists()
    with pytest.raises(SystemExit) as info:
        cli.main(["card", str(tmp_path / "ours"), "--plot", str(tmp_path / "missing.png")])
    assert "--plot" in str(info.value.code) and "no such file" in str(info.value.code)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(tmp_path / "stock")
    with pytest.raises(SystemExit) as info:
        cli.main(["card", str(tmp_path / "stock")])
    assert "holds ['BertForMaskedLM'], not an hf_sparse model" in str(info.value.code)


def test_benchmark_command_prints_a_checked_row_per_pattern_and_length(capsys):
    from hf_sparse.benchmarking import TOLERANCE

    sizes = ["--heads", "2", "--head-dim", "16", "--repeats", "1"]
    cli.main(["benchmark", "--patterns", "window:8", "--lengths", "128", *sizes])
    lines = capsys.readouterr().out.splitlines()
    assert "measured side by side in this run" in lines[0] and "scripts/benchmark_attention.py" in lines[0]
    rows = [line.split() for line in lines if line.startswith("window:8 ")]
    assert len(rows) == 1
    spec, length, block_density, *_ratios, max_diff = rows[0]
    assert (spec, int(length), float(block_density)) == ("window:8", 128, 1.0)  # one 128-tile
    assert 0 <= float(max_diff) < TOLERANCE
    layers = [line.split() for line in lines if line.startswith("layer ") and " window:8 " in line]
    assert len(layers) == 1  # the whole layer, mask building included, checked against the eager layer
    _, spec, length, dense_ms, *ratios, layer_diff = layers[0]
    assert (spec, int(length)) == ("window:8", 128) and float(dense_ms) > 0 and all(float(r) > 0 for r in ratios)
    assert 0 <= float(layer_diff) < 1e-4


def test_benchmark_command_reports_a_bad_spec_and_exits_nonzero(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["benchmark", "--patterns", "window:8", "windw:3", "--lengths", "128"])
    assert str(info.value.code).startswith("hf-sparse benchmark: unknown pattern 'windw'")
    assert "window:8 " not in capsys.readouterr().out  # all specs are checked before the first row is timed


def test_benchmark_command_refuses_to_time_a_kernel_that_disagrees_with_the_reference(monkeypatch):
    from hf_sparse import benchmarking

    monkeypatch.setattr(benchmarking, "TOLERANCE", 0.0)  # no kernel is exact: every check now fails
    with pytest.raises(SystemExit) as info:
        cli.main(["benchmark", "--patterns", "window:8", "--lengths", "128", "--heads", "1", "--head-dim", "8"])
    assert str(info.value.code).startswith("hf-sparse benchmark: ")
    assert "disagrees with the float64 eager reference for 'window:8' at L=128" in str(info.value.code)


# -- the user's own data through `datasets` ------------------------------------------------------------------


def _messages(n: int, seed: int = 3) -> list[str]:
    return english_sentences("de", n, seed=seed)


@pytest.mark.parametrize("kind", ["txt", "csv", "json", "parquet"])
def test_a_train_file_of_each_type_loads_with_a_held_out_split(tmp_path, kind):
    import datasets

    texts = _messages(200)
    path = tmp_path / f"train.{kind}"
    if kind == "txt":
        path.write_text("\n".join(texts) + "\n")
    else:
        frame = datasets.Dataset.from_dict({"text": texts, "n": list(range(200))})
        getattr(frame, {"csv": "to_csv", "json": "to_json", "parquet": "to_parquet"}[kind])(str(path))
    data = load_text_dataset(train_file=str(path), validation_size=0.25, seed=1)
    assert (len(data["train"]), len(data["validation"])) == (150, 50)
    assert sorted([*data["train"]["text"], *data["validation"]["text"]]) == sorted(texts)  # a split, nothing lost


def test_a_saved_dataset_with_its_own_splits_and_column_names_loads(tmp_path):
    import datasets

    datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"body": _messages(60)}),
        dev=datasets.Dataset.from_dict({"body": _messages(20, seed=4)}),
    ).save_to_disk(str(tmp_path / "saved"))
    data = load_text_dataset(str(tmp_path / "saved"), validation_split="dev", columns=("body",))
    assert list(data["validation"]["body"]) == _messages(20, seed=4) and len(data["train"]) == 60
    with pytest.raises(ValueError, match="has no split 'test'; splits: train, dev"):
        load_text_dataset(str(tmp_path / "saved"), validation_split="test", columns=("body",))
    with pytest.raises(ValueError, match="no column 'text'; columns present: body"):
        load_text_dataset(str(tmp_path / "saved"), validation_split="dev")


def test_bad_data_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="exactly one data source"):
        load_text_dataset()
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(ValueError, match="unknown extension '.xlsx'; valid: .txt, .json"):
        load_text_dataset(train_file=str(tmp_path / "a.xlsx"))


def test_packed_blocks_hold_every_text_in_order_between_cls_and_sep():
    data = english_corpus("de", max_sentences=300, validation_sentences=50, seed=0)
    corpus = mlm_corpus(data, vocab_size=500, block_size=24)
    tok = corpus.tokenizer
    blocks = corpus.train["input_ids"]
    assert all(len(b) == 24 and b[0] == tok.cls_token_id and b[-1] == tok.sep_token_id for b in blocks)
    stream = [i for b in blocks for i in b[1:-1]]
    first = tok(data["train"]["text"][0], add_special_tokens=False)["input_ids"]
    assert stream[: len(first) + 1] == [*first, tok.sep_token_id]  # the first message, then its separator
    with pytest.raises(ValueError, match="do not fill one block of 4096 tokens"):
        mlm_corpus(data, tok, block_size=4096)


# -- the command line ------------------------------------------------------------------------------------------


def test_help_and_argument_errors_answer_without_loading_torch():
    code = (
        "import sys, hf_sparse_cli\n"
        "for argv in (['--help'], ['demo', '--help'], ['demo', '--steps', '-1']):\n"
        "    try:\n"
        "        hf_sparse_cli.main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "False False"
    assert "hf-sparse demo: argument --steps: must be a whole number >= 1, got '-1'" in done.stderr


def test_every_option_of_every_command_has_a_sentence_and_every_command_an_example():
    parser = hf_sparse_cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert set(commands) >= {"patterns", "demo", "dam", "finetune", "sparsefinder", "card", "benchmark"}
    for name, command in commands.items():
        assert command.epilog.startswith("examples:\n  hf-sparse " + name), name
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings}"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--dataset", "d", "--train-file", "f.txt"], "give --dataset or --train-file, not both"),
        (["dam", "--validation-file", "v.txt"], "--validation-file goes with --train-file"),
        (["demo", "--train-file", "missing.txt"], "--train-file missing.txt: no such file"),
        (["demo", "--push-to-hub"], "--push-to-hub needs --hub-model-id"),
        (["demo", "--hub-model-id", "a/b/c"], "--hub-model-id a/b/c: a repository id is NAME or ORG/NAME"),
        (["demo", "--model", "not a/valid id"], "not a checkpoint directory, nor a Hub model id"),
    ],
)
def test_training_commands_check_sources_and_hub_options_before_any_work(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--output-dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1  # one line
    assert not (tmp_path / "out").exists()


def test_a_model_folder_without_config_or_tokenizer_is_named_before_any_work(tmp_path, capsys):
    SparseBertForMaskedLM(SparseBertConfig(**tiny_kwargs())).save_pretrained(tmp_path / "weights_only")
    (tmp_path / "empty").mkdir()
    for folder, words in (("empty", "holds no config.json"), ("weights_only", "no tokenizer next to the weights")):
        with pytest.raises(SystemExit) as info:
            cli.main(["dam", "--model", str(tmp_path / folder), "--output-dir", str(tmp_path / "out")])
        assert info.value.code == 2 and words in capsys.readouterr().err


def test_a_non_empty_output_dir_is_refused_unless_overwrite(tmp_path, capsys):
    (tmp_path / "kept.txt").write_text("earlier work")
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--steps", "1", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "is not empty: choose another one, pass --resume to continue the run" in err
    assert os.listdir(tmp_path) == ["kept.txt"]


def test_a_missing_column_fails_in_one_line_and_leaves_no_empty_output_folder(tmp_path):
    (tmp_path / "t.csv").write_text("body\nhello there\nsecond line\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--train-file", str(tmp_path / "t.csv"), "--output-dir", str(tmp_path / "out")])
    assert str(info.value.code).startswith("hf-sparse demo: train data has no column 'text'; columns present: body")
    assert not (tmp_path / "out").exists()


def test_demo_trains_on_a_user_text_file_and_dam_on_a_user_checkpoint(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("\n".join(_messages(400)) + "\n")
    small = ["--steps", "2", "--batch-size", "4", "--max-length", "32", "--vocab-size", "300"]
    cli.main(["demo", "--train-file", str(tmp_path / "notes.txt"), *small, "--output-dir", str(tmp_path / "a")])
    out = capsys.readouterr().out
    assert "data: 360 training / 40 validation examples" in out
    card = (tmp_path / "a" / "model" / "README.md").read_text()
    assert "On held-out 10 % of notes.txt." in card  # what was evaluated on, not the training file's name
    # the saved model (with its tokenizer) is a --model for the next command: DAM with the user's checkpoint
    model_dir = str(tmp_path / "a" / "model")
    cli.main(
        ["dam", "--model", model_dir, "--train-file", str(tmp_path / "notes.txt"), "--steps", "2"]
        + ["--search-steps", "1", "--max-length", "32", "--batch-size", "4", "--output-dir", str(tmp_path / "b")]
    )
    assert "pattern now 'learned'" in capsys.readouterr().out
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "b" / "model", trust_remote_code=True)
    first = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=True)
    assert reloaded.config.vocab_size == first.config.vocab_size  # the user's model and tokenizer, not a new one


def test_a_checkpoint_without_a_masked_lm_head_is_said_in_plain_words(tmp_path, caplog):
    from transformers import BertModel

    from hf_sparse.data import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(_messages(300), vocab_size=200)
    BertModel(tiny_bert_config(vocab_size=len(tokenizer), max_position_embeddings=32)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    (tmp_path / "notes.txt").write_text("\n".join(_messages(200)) + "\n")
    cli.main(
        ["demo", "--model", str(tmp_path / "m"), "--train-file", str(tmp_path / "notes.txt"), "--steps", "1"]
        + ["--max-length", "32", "--batch-size", "4", "--output-dir", str(tmp_path / "out")]
    )
    said = "masked-LM head cls.predictions (5 tensors): the checkpoint has none, so it starts untrained"
    assert caplog.text.count(said) == 1  # once, in plain words


def test_the_dam_command_runs_unchanged_under_accelerate_launch_with_two_processes(tmp_path):
    from test_distributed import launch_command

    out = tmp_path / "out"
    argv = ["-m", "hf_sparse_cli", "dam", "--steps", "4", "--search-steps", "2", "--max-sentences", "300"]
    argv += ["--eval-sentences", "40", "--max-length", "32", "--batch-size", "4", "--output-dir", str(out)]
    done = subprocess.run(
        [*launch_command(29547), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("model, tokenizer, metrics.json and model card written to") == 1  # main process only
    assert done.stdout.count("pattern now 'learned'") == 2  # both processes trained and froze the same mask
    model = AutoModelForMaskedLM.from_pretrained(out / "model", trust_remote_code=True)
    assert model.config.attention_pattern == "learned"


def test_sparsefinder_translation_fits_an_entmax_marian_from_a_user_csv(tmp_path, capsys):
    from transformers import AutoModelForSeq2SeqLM

    pairs = [(s, t) for s, t in gettext_pairs("de") if 3 <= len(s.split()) <= 8][:300]
    lines = ["source,target", *(f'"{s.replace(chr(34), "")}","{t.replace(chr(34), "")}"' for s, t in pairs)]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    cli.main(
        ["sparsefinder", "--task", "translation", "--train-file", str(tmp_path / "pairs.csv"), "--steps", "4"]
        + ["--d-model", "32", "--vocab-size", "300", "--dev-size", "12", "--test-size", "12", "--fit-sentences", "24"]
        + ["--epochs", "1", "--validation-size", "0.1", "--batch-size", "8", "--output-dir", str(tmp_path / "out")]
    )
    out = capsys.readouterr().out
    assert "data: 270 training / 30 validation examples" in out and "operating point distance" in out
    metrics = json.loads((tmp_path / "out" / "model" / "metrics.json").read_text())
    assert metrics["target_recall"] == 0.95 and metrics["train_pairs"] == 270  # the translation defaults
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out" / "model", trust_remote_code=True)
    assert model.config.sparsefinder["window"] == 3 and model.config.sparsefinder["enabled"] is True


# -- Hugging Face's translation format and the data's own test split ----------------------------------------


def _hub_style_translation_dataset(folder, splits=("train", "validation", "test")):
    """What wmt16 / opus_books look like: one ``translation`` column of {language: text} dicts (``Translation``
    feature) per split, here with real German/English gettext pairs, a distinct block of pairs per split."""
    import datasets

    features = datasets.Features({"translation": datasets.Translation(languages=["de", "en"])})
    pairs = gettext_pairs("de")[:100]
    blocks = {"train": pairs[:60], "validation": pairs[60:80], "test": pairs[80:100]}
    data = datasets.DatasetDict(
        {
            name: datasets.Dataset.from_dict(
                {"translation": [{"en": s, "de": t} for s, t in blocks[name]]}, features=features
            )
            for name in splits
        }
    )
    data.save_to_disk(str(folder))
    return {name: [(t, s) for s, t in block] for name, block in blocks.items()}  # German→English pairs


def test_a_hub_style_translation_dataset_loads_with_its_test_split_and_its_languages(tmp_path):
    from hf_sparse.translation_sparsefinder import load_pairs

    want = _hub_style_translation_dataset(tmp_path / "wmt")
    data = load_text_dataset(
        str(tmp_path / "wmt"), validation_split="validation", test_split="test", columns=("translation",)
    )
    assert list(data) == ["train", "validation", "test"]
    corpus = load_pairs(data, source_lang="de", target_lang="en", dev_size=8, test_size=15)
    assert corpus.train == want["train"] and corpus.dev == want["validation"][:8] and corpus.test == want["test"][:15]
    backwards = load_pairs(data, source_lang="en", target_lang="de", dev_size=8, test_size=15)
    assert backwards.test == [(e, d) for d, e in want["test"][:15]]
    # the other commands (no test options) see train and validation only, as before
    assert list(load_text_dataset(str(tmp_path / "wmt"), validation_split="validation", columns=())) == [
        "train",
        "validation",
    ]
    with pytest.raises(ValueError, match="has no split 'newstest'; splits: train, validation, test"):
        load_text_dataset(str(tmp_path / "wmt"), test_split="newstest", columns=("translation",))
    with pytest.raises(ValueError, match="test split 'validation' is also the validation split"):
        load_text_dataset(str(tmp_path / "wmt"), validation_split="validation", test_split="validation", columns=())


def test_the_default_test_split_is_optional_and_a_named_one_is_not(tmp_path):
    _hub_style_translation_dataset(tmp_path / "no_test", splits=("train", "validation"))
    optional = dict(validation_split="validation", test_split="test", columns=("translation",))
    assert list(load_text_dataset(str(tmp_path / "no_test"), test_split_optional=True, **optional)) == [
        "train",
        "validation",
    ]
    with pytest.raises(ValueError, match="has no split 'test'; splits: train, validation"):
        load_text_dataset(str(tmp_path / "no_test"), **optional)
    # nor does the optional default collide with a split the user trains on
    _hub_style_translation_dataset(tmp_path / "wmt")
    trained_on_test = load_text_dataset(str(tmp_path / "wmt"), split="test", test_split_optional=True, **optional)
    assert list(trained_on_test) == ["train", "validation"] and len(trained_on_test["train"]) == 20


def test_jsonl_files_with_nested_translation_rows_load_with_a_test_file(tmp_path):
    from hf_sparse.translation_sparsefinder import load_pairs

    pairs = gettext_pairs("de")[:50]
    files = {"train": pairs[:30], "validation": pairs[30:40], "test": pairs[40:]}
    for name, block in files.items():
        rows = [json.dumps({"id": i, "translation": {"en": s, "de": t}}) for i, (s, t) in enumerate(block)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    data = load_text_dataset(
        train_file=str(tmp_path / "train.jsonl"),
        validation_file=str(tmp_path / "validation.jsonl"),
        test_file=str(tmp_path / "test.jsonl"),
        columns=("translation",),
    )
    corpus = load_pairs(data, source_lang="en", target_lang="de", dev_size=10, test_size=10)
    assert (corpus.train, corpus.dev, corpus.test) == (files["train"], files["validation"], files["test"])
    with pytest.raises(ValueError, match="its 'translation' column has no language 'fr'; languages present: de, en"):
        load_pairs(data, source_lang="en", target_lang="fr")
    with pytest.raises(ValueError, match="test split 'test' is a split of a dataset; with a train file, give a test"):
        load_text_dataset(train_file=str(tmp_path / "train.jsonl"), test_split="test", columns=())


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--task", "translation", "--dataset", "d", "--source-lang", "de"], "--source-lang and --target-lang go"),
        (
            ["--task", "translation", "--dataset", "d", "--source-lang", "de", "--target-lang", "en"]
            + ["--target-column", "en"],
            "--source-lang/--target-lang with --source-column/--target-column is ambiguous",
        ),
        (["--task", "translation", "--source-lang", "de", "--target-lang", "en"], "--source-lang reads --dataset or"),
        (
            ["--task", "translation", "--target-column", "de"],
            "--target-column reads --dataset or --train-file; without",
        ),
        (
            ["--task", "translation", "--dataset", "d", "--source-lang", "de", "--target-lang", "de"],
            "--source-lang and --target-lang are both 'de'",
        ),
        (["--source-lang", "de", "--target-lang", "en", "--dataset", "d"], "--source-lang is for --task translation"),
        (["--task", "translation", "--train-file", "f.csv", "--test-split", "test"], "--test-split names a split"),
        (["--task", "translation", "--dataset", "d", "--test-file", "t.csv"], "--test-file goes with --train-file"),
    ],
)
def test_translation_data_options_are_checked_before_any_work(argv, words, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["sparsefinder", *argv, "--output-dir", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _capture_translation_run(monkeypatch) -> dict:
    """The translation command up to its run: parsing, checks and data loading are real; the run itself reads the
    pairs with the arguments the command gave it (hf_sparse.translation_sparsefinder.load_pairs) and stops there."""
    from hf_sparse import translation_sparsefinder

    seen = {}

    def run(*, pairs, lang, source_column, target_column, source_lang, target_lang, dev_size, test_size, **_):
        seen["corpus"] = translation_sparsefinder.load_pairs(
            pairs,
            lang,
            source_column,
            target_column,
            dev_size,
            test_size,
            source_lang=source_lang,
            target_lang=target_lang,
        )

    monkeypatch.setattr(translation_sparsefinder, "run_translation_sparsefinder", run)
    return seen


def test_the_translation_command_reads_hub_style_languages_and_the_dataset_test_split(tmp_path, monkeypatch, caplog):
    want = _hub_style_translation_dataset(tmp_path / "wmt")
    seen = _capture_translation_run(monkeypatch)
    base = ["sparsefinder", "--task", "translation", "--source-lang", "de", "--target-lang", "en"]
    sizes = ["--validation-split", "validation", "--dev-size", "8", "--test-size", "12"]
    with caplog.at_level("INFO", logger="hf_sparse"):
        cli.main([*base, "--dataset", str(tmp_path / "wmt"), *sizes, "--output-dir", str(tmp_path / "a")])
    corpus = seen["corpus"]
    assert corpus.train == want["train"] and corpus.dev == want["validation"][:8]
    assert corpus.test == want["test"][:12]  # the dataset's own test pairs, not validation pairs 8-19
    assert "test pairs: the first 12 of the dataset's test split" in caplog.text

    # without a test split, the default "test" is optional: test pairs are carved out of validation, and said so
    _hub_style_translation_dataset(tmp_path / "no_test", splits=("train", "validation"))
    caplog.clear()
    with caplog.at_level("INFO", logger="hf_sparse"):
        cli.main([*base, "--dataset", str(tmp_path / "no_test"), *sizes, "--output-dir", str(tmp_path / "b")])
    assert seen["corpus"].test == want["validation"][8:20]
    assert "test pairs: validation pairs 8-19 (the dataset has no test split" in caplog.text

    # a named test split the dataset lacks, and a language it lacks, end in one line naming what is there
    for extra, words in (
        (["--test-split", "newstest"], "has no split 'newstest'; splits: train, validation"),
        (["--target-lang", "fr"], "has no language 'fr'; languages present: de, en"),
    ):
        with pytest.raises(SystemExit) as info:
            cli.main([*base, "--dataset", str(tmp_path / "wmt"), *sizes, *extra, "--output-dir", str(tmp_path / "c")])
        assert words in str(info.value.code) and str(info.value.code).startswith("hf-sparse sparsefinder: ")


def test_max_train_and_eval_samples_keep_the_first_examples_of_each_split(tmp_path, monkeypatch, capsys):
    want = _hub_style_translation_dataset(tmp_path / "wmt")
    seen = _capture_translation_run(monkeypatch)
    argv = ["sparsefinder", "--task", "translation", "--source-lang", "de", "--target-lang", "en"]
    argv += ["--dataset", str(tmp_path / "wmt"), "--validation-split", "validation", "--dev-size", "4"]
    argv += ["--test-size", "3", "--max-train-samples", "7", "--max-eval-samples", "5"]
    cli.main([*argv, "--output-dir", str(tmp_path / "a")])
    corpus = seen["corpus"]
    assert corpus.train == want["train"][:7]  # the first 7 of 60
    assert corpus.dev == want["validation"][:4]  # within the first 5 of 20
    assert corpus.test == want["test"][:3]  # the test split is not cut by --max-eval-samples (--test-size is)
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--max-train-samples", "0", "--output-dir", str(tmp_path / "b")])
    assert info.value.code == 2 and "--max-train-samples" in capsys.readouterr().err


def test_finetune_compares_dense_and_dam_on_minilm_and_takes_a_user_csv(tmp_path, capsys):
    small = ["--steps", "2", "--batch-size", "8", "--max-length", "16"]
    cli.main(
        ["finetune", "--runs", "dense", "dam", "--num-labels", "2", "--max-per-label", "24", *small]
        + ["--output-dir", str(tmp_path / "builtin")]
    )
    out = capsys.readouterr().out
    assert "| run | attention | attention sparsity | accuracy | macro-F1 |" in out
    results = json.loads((tmp_path / "builtin" / "results.json").read_text())
    assert [row["run"] for row in results] == ["dense", "dam"]
    assert all(0 <= row["accuracy"] <= 1 for row in results)
    config = json.loads((tmp_path / "builtin" / "dam" / "config.json").read_text())
    assert "learned" in config["attention_pattern"]
    # your own data: a CSV with text and string labels in columns of your naming
    pairs = gettext_pairs("de")[:60]
    rows = ["body,topic", *(f'"{s.replace(chr(34), "")}",{"short" if len(s) < 30 else "long"}' for s, _ in pairs)]
    (tmp_path / "mine.csv").write_text("\n".join(rows) + "\n")
    cli.main(
        ["finetune", "--runs", "dense", "--train-file", str(tmp_path / "mine.csv"), "--text-column", "body"]
        + ["--label-column", "topic", *small, "--output-dir", str(tmp_path / "mine")]
    )
    assert "data: 54 training / 6 validation examples" in capsys.readouterr().out
    assert "On held-out 10 % of mine.csv." in (tmp_path / "mine" / "dense" / "README.md").read_text()
    saved = json.loads((tmp_path / "mine" / "dense" / "config.json").read_text())
    assert set(saved["id2label"].values()) == {"short", "long"}
