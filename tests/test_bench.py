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
    main(["--model.name", tiny_dir, "--model.device", "cpu", "--data", data_file, "--batch", "2",
          "--generation.max_new_tokens", "6", "--repeats", "1", "--modes", "[full,hf,exit,all_exits,dynamic,speculative]",
          "--draft_layer", "[1,2]", "--n_draft", "[2]", "--out_dir", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert "max_new_tokens: 6" in (tmp_path / "config.yaml").read_text()
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


@pytest.mark.parametrize("extra, message", [
    (["--modes", "[full,warp]"], "modes = 'warp': expected one of hf, hf_static"),
    (["--batch", "0"], "batch = 0 is out of range: it must be an integer ≥ 1"),
    (["--random_config", "gpt-5"], "random_config 'gpt-5': choose from llama2-7b"),
    (["--generation.max_new_tokens", "0"], "generation.max_new_tokens = 0 is out of range"),
])
def test_bad_options_are_refused_before_loading(tiny_dir, data_file, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model.name", tiny_dir, "--model.device", "cpu", "--data", data_file, *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def block_adapter(tiny_dir, tmp_path_factory):
    """A shared exit block on exits 1 and 2 of the tiny model, with random weights, saved as an adapter directory."""
    import torch
    from transformers import AutoModelForCausalLM

    from earlyexit.adapters import ExitAdapters, block_template

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    adapters = ExitAdapters([1, 2], model.config.hidden_size, kind="block", template=block_template(model))
    torch.manual_seed(0)
    for param in adapters.parameters():
        torch.nn.init.normal_(param, std=0.05)
    directory = tmp_path_factory.mktemp("block_adapter")
    adapters.save(directory)
    return str(directory)


def test_a_shared_exit_block_is_timed_on_every_path(tiny_dir, data_file, block_adapter, tmp_path, capsys):
    """Every mode runs with a shared exit block, the generic one too (the block as its own module: the same text);
    off the fast path the default modes leave out dynamic exits and speculation, and say so."""
    common = ["--model.name", tiny_dir, "--model.adapter", block_adapter, "--model.device", "cpu", "--data", data_file,
              "--generation.max_new_tokens", "4", "--repeats", "1", "--draft_layer", "[2]", "--n_draft", "[2]"]
    main([*common, "--out_dir", str(tmp_path / "fast")])
    rows = json.loads((tmp_path / "fast" / "bench.json").read_text())["rows"]
    assert {"full", "generic", "hf", "exit 2", "speculative E=2 d=2"} <= {row["mode"] for row in rows}
    assert next(row for row in rows if row["mode"] == "check" and row["reference"] == "generic")["identical"] == 1.0
    main([*common, "--generation.fast", "false", "--out_dir", str(tmp_path / "generic")])
    modes = {row["mode"] for row in json.loads((tmp_path / "generic" / "bench.json").read_text())["rows"]}
    assert {"full", "generic", "exit 2"} <= modes and not any(m.startswith(("dynamic", "speculative")) for m in modes)
    assert "modes dynamic and speculative left out" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--generation.fast", "false", "--modes", "[full,dynamic]"], "--modes dynamic: the shared exit block of --model.adapter"),
    (["--generation.fast", "false", "--modes", "[speculative]"], "fast path only, which generation.fast false do not take"),
])
def test_what_cannot_decode_a_shared_exit_block_is_refused(tiny_dir, data_file, block_adapter, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model.name", tiny_dir, "--model.adapter", block_adapter, "--model.device", "cpu", "--data", data_file,
              *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
