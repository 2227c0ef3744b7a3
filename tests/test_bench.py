"""The bench CLI end to end on a tiny model: every mode runs, and the greedy texts it compares agree."""

import json

import pytest

from earlyexit.bench import main
from tiny import records_file

RECORDS = [{"instruction": f"Count to {i}.", "input": "", "output": "1 2 3"} for i in range(4)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return records_file(tmp_path_factory, RECORDS)


def test_every_mode_against_hf(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--model", tiny_dir, "--device", "cpu", "--data", data_file, "--batch", "2", "--new_tokens", "6",
          "--repeats", "1", "--modes", "full,hf,exit,all_exits,dynamic,speculative", "--draft_layer", "1,2",
          "--n_draft", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    modes = [row["mode"] for row in rows]
    assert modes[:2] == ["full", "hf"] and "exit 1" in modes and "all_exits 1,2,3,4" in modes
    assert {"speculative E=1 d=2", "speculative E=2 d=2"} <= set(modes)
    check = next(row for row in rows if row["mode"] == "check")
    assert check["identical"] == 1.0  # float32: our full-depth greedy text is HF generate's
    for row in rows:
        if row["mode"].startswith("speculative"):
            assert row["identical"] == 1.0 and 0 <= row["acceptance"] <= 1
        if row["mode"] != "check":
            assert row["tokens_per_s"] > 0
    assert "| full |" in capsys.readouterr().out


def test_unknown_mode_is_one_clear_error(tiny_dir, data_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", tiny_dir, "--device", "cpu", "--data", data_file, "--modes", "full,warp"])
    assert exit_info.value.code == 2 and "unknown modes ['warp']" in capsys.readouterr().err
