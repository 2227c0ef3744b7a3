"""Bad input through the real command line: one clear line on stderr, exit status 2, no traceback."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from commands import refusal, refusal_process, run_command
from tiny import char_tokenizer, save_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    good = root / "alpaca_data.json"
    good.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 3))
    bad = root / "broken.json"
    bad.write_text('[{"instruction": "Say hi.", "input": "", "output": "Hi."},\n {"instruction": ')
    opt = root / "opt"
    config = AutoConfig.for_model("opt", vocab_size=128, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                  num_attention_heads=2, word_embed_proj_dim=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(opt)
    char_tokenizer().save_pretrained(opt)
    return {"good": str(good), "bad": str(bad), "opt": str(opt), "tiny": save_tiny(root / "tiny"), "out": str(root / "out")}


CASES = {
    "missing model path": (["--model.name", "/no/such/model"], "model path '/no/such/model' does not exist"),
    "unsupported architecture": (["--model.name", "{opt}"], "unsupported architecture 'opt'; supported model types: gemma, gemma2, gemma3_text, gpt2"),
    "exit layer 0": (["--exit_layers", "0"], r"exit layer 0 is out of range: this model has layers 1..4"),
    "exit layer above N": (["--exit_layers", "3,9"], r"exit layer 9 is out of range"),
    "missing data file": (["--data.source", "/no/such/alpaca_data.json"], "data file '/no/such/alpaca_data.json' not found"),
    "malformed JSON": (["--data.source", "{bad}"], "malformed JSON at line 2"),
}


def evaluate_args(paths, case: str) -> list[str]:
    extra, _ = CASES[case]
    return ["--model.name", paths["tiny"], "--data.source", paths["good"], "--metrics.names", "[bleu]",
            "--out_dir", f"{paths['out']}/{case}", *[e.format(**paths) for e in extra]]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(paths, case, monkeypatch, capsys):
    assert CASES[case][1] in refusal("evaluate", evaluate_args(paths, case), monkeypatch, capsys)


def test_bad_input_in_a_real_process(paths):
    assert CASES["missing data file"][1] in refusal_process("earlyexit.evaluate", evaluate_args(paths, "missing data file"))


# --- one convention for every command ----------------------------------------------------------------

import ast  # noqa: E402

ENTRY_POINTS = ("evaluate", "train", "lens", "judge", "serve", "bench")
SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("name", [*ENTRY_POINTS, *SCRIPTS])
def test_every_command_answers_help_and_print_config_and_takes_its_own_config(name, tmp_path, monkeypatch, capsys):
    assert run_command(name, ["--help"], monkeypatch) == 0
    assert "--config" in capsys.readouterr().out
    sub = ["eval"] if name == "bench_multigpu.py" else []
    assert run_command(name, [*sub, "--print_config"], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert printed.strip() and ":" in printed
    config = tmp_path / "config.yaml"
    config.write_text(printed)
    assert run_command(name, [*sub, "--config", str(config), "--print_config"], monkeypatch) == 0
    assert capsys.readouterr().out == printed  # what --print_config writes, --config reads back unchanged


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_module_imports_an_entry_point():
    entry = {f"earlyexit.{name}" for name in ENTRY_POINTS}
    offenders = {}
    for path in sorted((ROOT / "earlyexit").rglob("*.py")):
        own = f"earlyexit.{path.stem}"
        hits = sorted(_imports(path) & (entry - {own}))
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert not offenders, f"modules importing entry points: {offenders}"


def test_commands_write_their_resolved_config(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "lens"
    assert run_command("lens", ["--model.name", tiny_dir, "--model.device", "cpu", "--prompt", "hi",
                                "--max_new_tokens", "3", "--out_dir", str(out)], monkeypatch) == 0
    assert "max_new_tokens: 3" in (out / "config.yaml").read_text()
    bench = tmp_path / "bench"
    assert run_command("bench", ["--model.name", tiny_dir, "--model.device", "cpu", "--modes", "[full]", "--repeats", "1",
                                 "--generation.max_new_tokens", "3", "--generation.context", "truncate",  # Alpaca prompts,
                                 "--out_dir", str(bench)], monkeypatch) == 0  # characters: past a tiny model's 256
    assert (bench / "config.yaml").is_file() and (bench / "bench.json").is_file()


@pytest.mark.parametrize("name, argv, message", [
    ("lens", ["--prompt", "hi", "--tuned.lr", "0"], "tuned.lr = 0.0 is out of range: it must be > 0"),
    ("lens", ["--limit", "0"], "limit = 0 is out of range"),
    ("bench_train.py", ["--device", "cpu", "--batch", "0"], "batch = 0 is out of range"),
    ("bench_train.py", ["--device", "cpu", "--paths", "[]"], "paths: name at least one of padded, packed, cached, fused, fast"),
    ("acceptance.py", ["--records", "0"], "records = 0 is out of range"),
    ("acceptance.py", ["--n_draft", "[0]"], "n_draft ≥ 1"),
    ("sweep_dynamic.py", ["--records", "0"], "records = 0 is out of range"),
    ("sweep_dynamic.py", ["--records", "250"], "calibration records 200..215 overlap the evaluated records 0..249"),
    ("sweep_dynamic.py", ["--speculative", "[[15, 0]]"], "speculative d = 0 is out of range"),
    ("sweep_dynamic.py", ["--generation.check_layers", "[0, 15]"], "generation.check_layers = [0, 15] is out of range"),
    ("bench", ["--generation.check_layers", "[]"], "generation.check_layers = [] is out of range"),
    ("profile_decode.py", ["--tokens", "0"], "tokens = 0 is out of range"),
    ("profile_decode.py", ["--device", "cpu", "--decide", "[host]", "--check_layers", "[30]"], "check_layers [30]: layers in 1..29"),
    ("profile_decode.py", ["--device", "cpu", "--shape", "gpt-5"], "shape 'gpt-5': choose from"),
    ("profile_decode.py", ["--device", "cpu", "--report_of", "no/such.json"], "report_of no/such.json: not a run saved by --out"),
    ("time_to_loss.py", ["--every", "0"], "every = 0 is out of range"),
    ("bench_branches.py", ["--device", "cpu", "--kernels", "[0]"], "kernels = 0 is out of range"),
    ("bench_branches.py", ["--device", "cpu", "--work", "mv", "--mv_shape", "[3]"], "mv_shape [3]: [rows, columns]"),
    ("self_answers.py", ["--samples", "0"], "samples = 0 is out of range"),
    ("self_answers.py", ["--temperature", "0"], "temperature = 0"),
    ("time_to_loss.py", ["--candidate", "nowhere.yaml"], "config 'nowhere.yaml' not found"),
    ("bench_evaluate.py", ["--limit", "-1"], "limit = -1 is out of range"),
    ("bench_multigpu.py", ["train", "--devices", "[0]"], "devices = 0 is out of range"),
])
def test_scripts_and_commands_refuse_bad_values_with_one_line(name, argv, message, monkeypatch, capsys):
    assert run_command(name, argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]


def test_check_layers_at_or_above_the_last_layer_are_refused_before_decoding(tiny_dir, monkeypatch, capsys):
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--modes", "[full,dynamic]", "--generation.check_layers",
            "[2, 4]"]
    assert run_command("bench", argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: generation.check_layers = [2, 4] is out of range: it must be below the last layer")
    assert not any("tokens/s" in line for line in err)


def test_self_answers_writes_the_models_own_greedy_answers(tiny_dir, tmp_path, monkeypatch):
    import json

    from earlyexit.loading import ModelArgs, load_model
    from earlyexit.data import encode_prompt
    from earlyexit.model import EarlyExitHead

    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(9)]))
    out = tmp_path / "self.json"
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--data", str(data), "--skip", "4", "--max_new_tokens", "5",
            "--batch_size", "2", "--out", str(out), "--work_dir", str(tmp_path / "work")]
    assert run_command("self_answers.py", argv, monkeypatch) == 0
    written = json.loads(out.read_text())
    assert [r["instruction"] for r in written] == [f"Say {i}." for i in range(4, 9)]  # the evaluation split is skipped
    model, tokenizer = load_model(ModelArgs(name=tiny_dir, device="cpu"))
    ee = EarlyExitHead(model)
    for record in written:
        ids = torch.tensor([encode_prompt({**record, "output": "-"}, tokenizer)])
        gen = ee.generate(ids, torch.ones_like(ids), ee.n_layers, max_new_tokens=5)
        assert record["output"] == tokenizer.decode(gen.tokens[0, : int(gen.n_tokens[0])].tolist(), skip_special_tokens=True).strip()
    assert run_command("self_answers.py", argv, monkeypatch) == 0  # a rerun resumes: nothing left to generate
    assert json.loads(out.read_text()) == written



def test_self_answers_adds_sampled_answers_after_each_greedy_one(tiny_dir, tmp_path, monkeypatch):
    """--samples 3: each prompt's greedy answer (the one-sample file's), then its distinct sampled answers."""
    import json

    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(7)]))
    common = ["--model.name", tiny_dir, "--model.device", "cpu", "--data", str(data), "--skip", "2", "--max_new_tokens",
              "6", "--batch_size", "2"]
    greedy_out, sampled_out = tmp_path / "greedy.json", tmp_path / "sampled.json"
    assert run_command("self_answers.py", [*common, "--out", str(greedy_out), "--work_dir", str(tmp_path / "g")], monkeypatch) == 0
    argv = [*common, "--samples", "3", "--temperature", "1.5", "--out", str(sampled_out), "--work_dir", str(tmp_path / "s")]
    assert run_command("self_answers.py", argv, monkeypatch) == 0
    greedy, sampled = json.loads(greedy_out.read_text()), json.loads(sampled_out.read_text())
    by_prompt = {}
    for record in sampled:
        by_prompt.setdefault(record["instruction"], []).append(record["output"])
    assert list(by_prompt) == [r["instruction"] for r in greedy]  # prompt by prompt, in source order
    for record in greedy:
        answers = by_prompt[record["instruction"]]
        assert answers[0] == record["output"] and len(set(answers)) == len(answers) <= 3
    assert len(sampled) > len(greedy)  # at temperature 1.5 the tiny model's samples differ from its greedy answers
    assert (tmp_path / "s_sample2" / "generations.jsonl").is_file()
    assert run_command("self_answers.py", argv, monkeypatch) == 0  # resumed: the same file
    assert json.loads(sampled_out.read_text()) == sampled

def test_profile_decode_names_every_piece_and_part_of_every_mode(monkeypatch, capsys, tmp_path):
    """On the CPU (operators stand for kernels): every setting is profiled as it runs, piece by piece and part by
    part, and each table names the engine's pieces and parts."""
    import json

    from earlyexit import tiny

    monkeypatch.setitem(tiny.RANDOM_SHAPES, "tiny-llama", dict(model_type="llama", **tiny.TINY_CONFIGS["llama"], vocab_size=128))
    argv = ["--shape", "tiny-llama", "--device", "cpu", "--dtype", "float32", "--batch", "2", "--prompt_len", "5",
            "--tokens", "18", "--check_layers", "[1,2]", "--decide", "[host]", "--compile", "false", "--repeats", "1",
            "--n_draft", "[2]", "--measures", "[learned]", "--out", str(tmp_path / "profile.json")]
    assert run_command("profile_decode.py", argv, monkeypatch) == 0
    out = capsys.readouterr().out
    rows = {row["setting"]: row for row in json.loads((tmp_path / "profile.json").read_text())["rows"]}
    assert list(rows) == ["full depth", "fixed exit 1", "dynamic learned, never", "dynamic learned, at 1", "speculative E=1 d=2"]
    assert [rows[name]["layers"] for name in ("full depth", "fixed exit 1", "dynamic learned, never", "dynamic learned, at 1")] == [4, 1, 4, 1]
    for row in rows.values():
        assert row["step_us_host"] > 0 and row["kernels_per_step_host"] > 0 and row["pieces"] and row["parts_eager"]
    parts = {part["part"] for part in rows["dynamic learned, never"]["parts_eager"]}
    assert any(part.endswith("/block") for part in parts) and any("probe" in part for part in parts)
    assert any("K/V fill" in part["part"] for part in rows["dynamic learned, at 1"]["parts_eager"])  # the deferred K/V
    assert "one check decided on the host costs" in out and "| piece | µs a step |" in out
    never, full = rows["dynamic learned, never"]["kernel_names_host"], rows["full depth"]["kernel_names_host"]
    more = out.split("the kernels whose launches a step differ:")[1].split("\n\n")[1].splitlines()[2:]
    assert more and all(name in never or name in full for name in (line.split("|")[1].strip() for line in more))
    assert float(more[0].split("|")[4]) > 0  # the checks add launches: the most first
    # the tables again from the saved rows, profiling nothing (a run stopped before its report keeps its rows)
    # the run's settings come from the file, not from flags that differ from the run's
    again = argv[:-2] + ["--report_of", str(tmp_path / "profile.json"), "--batch", "7", "--tokens", "9"]
    assert run_command("profile_decode.py", again, monkeypatch) == 0
    reprinted = capsys.readouterr().out
    assert "as it runs:" not in reprinted and "one check decided on the host costs" in reprinted
    assert out.split("tiny-llama (random weights")[1] == reprinted.split("tiny-llama (random weights")[1]


def test_time_to_loss_stops_the_candidate_at_the_baselines_loss(tmp_path, monkeypatch, capsys):
    import json

    debug = str(ROOT / "configs" / "debug.yaml")
    argv = ["--baseline", debug, "--baseline_args", "[--trainer.max_steps, 4]", "--candidate", debug,  # numbers as numbers
            "--candidate_args", "[--trainer.max_steps, '12', --model.loss.fused, true, --data.pack, 'true', --model.optim.lr, 3e-3]",
            "--baseline_every", "2", "--every", "1", "--work_dir", str(tmp_path)]
    assert run_command("time_to_loss.py", argv, monkeypatch) == 0
    base = json.loads((tmp_path / "baseline" / "clock.json").read_text())
    cand = json.loads((tmp_path / "candidate" / "clock.json").read_text())
    assert [r["step"] for r in base["records"]] == [2, 4] and base["reached"] is None
    target = base["records"][-1]["ce"]
    assert set(target) == {"1", "2", "3", "4"}
    reached = cand["reached"]
    assert reached is not None and [r["step"] for r in cand["records"]] == list(range(1, reached + 1))  # it stopped there
    assert all(cand["records"][-1]["ce"][layer] <= ce for layer, ce in target.items())
    assert not any(all(r["ce"][layer] <= ce for layer, ce in target.items()) for r in cand["records"][:-1])
    out = capsys.readouterr().out
    assert f"candidate CE at step {reached}" in out and "× faster" in out
    # again with two batches a step, the baseline reused: one measurement a step
    at = argv.index("--candidate_args") + 1
    accumulated = [*argv[:at], argv[at][:-1].replace("'12'", "'4'") + ", --trainer.accumulate_grad_batches, 2]",
                   *argv[at + 1 :]]
    assert run_command("time_to_loss.py", accumulated, monkeypatch) == 0
    assert json.loads((tmp_path / "baseline" / "clock.json").read_text()) == base
    steps = [r["step"] for r in json.loads((tmp_path / "candidate" / "clock.json").read_text())["records"]]
    assert steps == sorted(set(steps))


def test_sweep_puts_every_mode_on_one_quality_speed_figure(tiny_dir, tmp_path, monkeypatch, capsys):
    import json

    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i} {i}."} for i in range(4)]))
    plot = tmp_path / "speed.png"
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--data", str(data), "--records", "4", "--batch", "2",
            "--generation.max_new_tokens", "6", "--generation.min_layer", "1", "--fixed", "[1, 2]", "--thresholds", "[0, 1.01]",
            "--speculative", "[[1, 2], [3, 3]]", "--hf", "true", "--speed_plot", str(plot), "--target", "0.95", "--calibrate", "0",
            "--plot", str(tmp_path / "depth.png")]
    assert run_command("sweep_dynamic.py", argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert re.search(r"calibrated threshold: (0\.0|1\.01) \(", out)  # a dynamic threshold, never a speculative setting
    rows = {(line.split("|")[1].strip(), line.split("|")[2].strip()): line.split("|") for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| exit")}
    rouge = {key: float(cells[4]) for key, cells in rows.items()}
    full = rouge[("fixed", "4")]
    assert rouge[("speculative", "E=1 d=2")] == rouge[("speculative", "E=3 d=3")] == rouge[("HF generate", "4")] == full
    assert rouge[("dynamic softmax", "0.0")] == rouge[("fixed", "1")] and rouge[("dynamic softmax", "1.01")] == full
    assert float(rows[("fixed", "4")][6]) == 1.0 and rows[("speculative", "E=1 d=2")][7].strip()  # ratio, acceptance
    assert rouge[("fixed", "4 (again, last)")] == full  # full depth again after every other setting
    assert plot.is_file() and plot.stat().st_size > 10_000 and (tmp_path / "depth.png").stat().st_size > 10_000


def test_a_sweep_cut_short_keeps_every_row_it_measured_and_figures_refuse_it(tiny_dir, tmp_path, monkeypatch, capsys):
    """Each row is written to sweep.json as it is measured (a GPU machine taken back mid-run keeps them), marked
    incomplete until the end; figures refuse an incomplete sweep in one line."""
    import json

    import yaml

    from earlyexit.engine import Engine

    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i} {i}."} for i in range(2)]))
    out_dir = tmp_path / "sweep"
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--data", str(data), "--records", "2", "--batch", "2",
            "--generation.max_new_tokens", "4", "--generation.min_layer", "1", "--fixed", "[1]", "--thresholds", "[1.01]",
            "--speculative", "[[1, 2]]", "--calibrate", "0", "--out_dir", str(out_dir)]

    def taken_back(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Engine, "generate_speculative", taken_back)
        try:
            run_command("sweep_dynamic.py", argv, patch)
        except KeyboardInterrupt:
            pass
    kept = json.loads((out_dir / "sweep.json").read_text())
    assert kept["complete"] is False
    assert [(row["kind"], row["setting"]) for row in kept["rows"]] == [("fixed", 1), ("fixed", 4), ("dynamic softmax", 1.01)]
    assert "measured fixed 4:" in capsys.readouterr().err
    manifest = tmp_path / "figures.yaml"
    manifest.write_text(yaml.safe_dump([{"out": str(tmp_path / "s.png"), "kind": "speed", "results": [str(out_dir)]}]))
    assert "cut short (3 rows)" in refusal("figures.py", ["--manifest", str(manifest)], monkeypatch, capsys)
    assert run_command("sweep_dynamic.py", argv, monkeypatch) == 0  # to the end: complete, every row
    done = json.loads((out_dir / "sweep.json").read_text())
    assert "complete" not in done and len(done["rows"]) == 5


def test_acceptance_reports_agreement_and_exact_speculation(tiny_dir, tmp_path, monkeypatch, capsys):
    import json

    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(5)]))
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--data", str(data), "--records", "5", "--batch", "2",
            "--generation.max_new_tokens", "6", "--exit_layers", "all", "--draft_layers", "[1, 3]", "--n_draft", "[2]"]
    assert run_command("acceptance.py", argv, monkeypatch) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"1", "2", "3"} <= set(rows)
    spec = [line for line in out.splitlines() if line.startswith("| 1 | 2 |") or line.startswith("| 3 | 2 |")]
    assert len(spec) == 2 and all(line.rstrip().endswith("| 5/5 |") for line in spec)  # speculation is exact


def test_acceptance_reads_a_shared_exit_block(tiny_dir, tmp_path, monkeypatch, capsys):
    import json

    from earlyexit.adapters import ExitAdapters, attach, block_template
    from earlyexit.loading import ModelArgs, load_model

    model, _ = load_model(ModelArgs(name=tiny_dir, device="cpu"))
    adapters = ExitAdapters([1, 2, 3], model.config.hidden_size, kind="block", template=block_template(model))
    attach(model, adapters)
    adapters.save(tmp_path / "adapter")
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(3)]))
    argv = ["--model.name", tiny_dir, "--model.device", "cpu", "--model.adapter", str(tmp_path / "adapter"), "--data", str(data),
            "--records", "3", "--generation.max_new_tokens", "5", "--exit_layers", "all", "--draft_layers", "[2]"]
    assert run_command("acceptance.py", argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert {"1", "2", "3"} <= {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")}
    spec = [line for line in out.splitlines() if line.startswith("| 2 | 4 |")]
    assert len(spec) == 1 and spec[0].rstrip().endswith("| 3/3 |")  # speculation through the block is exact


def test_bench_train_runs_both_paths_on_the_same_examples(tiny_dir, tmp_path, monkeypatch, capsys):
    import json

    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"It is {i} and more."} for i in range(400)]))
    argv = ["--model", tiny_dir, "--device", "cpu", "--dtype", "float32", "--data", str(data), "--batch", "4", "--seq", "512",
            "--steps", "1", "--warmup", "0", "--rank", "2", "--distill", "0.5", "--paths", "[padded, packed, cached, fused, fast]",
            "--checkpointing", "true"]
    assert run_command("bench_train.py", argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "gradient checkpointing on, blocks eager (fast: off, compiled)" in out
    lines = [line for line in out.splitlines() if line.startswith(("| pad", "| pack", "| cach", "| fus", "| fast"))]
    assert [line.split("|")[1].strip() for line in lines] == ["padded", "packed", "cached", "fused", "fast"]
    rows = [float(line.split("|")[2].split("×")[0]) for line in lines]
    assert rows[0] == 4.0 and rows[1] < 4.0  # the same 4 examples, packed into fewer rows


def test_bench_branches_times_every_plan(monkeypatch, capsys, tmp_path):
    """The branch benchmark's plans on the CPU (walked eagerly: the script checked, not the GPU's numbers): each plan
    once per kernel count, a branch not taken runs nothing, and the rows are saved."""
    out = tmp_path / "branches.json"
    argv = ["--device", "cpu", "--kernels", "[2,3]", "--depths", "[1,2]", "--repeats", "2", "--out", str(out)]
    assert run_command("bench_branches.py", argv, monkeypatch) == 0
    table = [line.split("|")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "µs" not in line]
    plans = ["flat", "then, depth 1", "then, depth 2", "else", "not taken"]
    assert [(p.strip(), int(k)) for p, k in table] == [(p, k) for k in (2, 3) for p in plans]
    saved = json.loads(out.read_text())
    assert saved["nodes"] is None and len(saved["rows"]) == 10
    # large kernels in the bodies: matrix-vector products
    argv = ["--device", "cpu", "--work", "mv", "--mv_shape", "[64,16]", "--kernels", "[1]", "--depths", "[1]", "--repeats", "2"]
    assert run_command("bench_branches.py", argv, monkeypatch) == 0
    assert "bf16 matrix-vector products 64x16" in capsys.readouterr().out

