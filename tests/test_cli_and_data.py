import pytest

from hf_sparse import cli
from hf_sparse.data import english_sentences, gettext_pairs


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
