"""No silent wrong answers: each case of issue #14 asserts its exit status and its one-line message (or the
refusal), through the commands' own ``main`` (one process; the lines are what a user sees on stderr)."""

import json
import warnings
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from earlyexit import evaluate, lens, train
from tiny import char_tokenizer, records_file

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(40)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return records_file(tmp_path_factory, RECORDS)


def refused(main, argv, capsys) -> str:
    """Run a command that must refuse: exit status 2 and exactly one ``error:`` line on stderr; returns it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


def eval_args(tiny_dir, data_file, out, *extra):
    return ["--model.name", tiny_dir, "--model.device", "cpu", "--data.source", data_file, "--data.limit", "4",
            "--data.batch_size", "4", "--generation.max_new_tokens", "4", "--metrics.names", "[bleu]",
            "--metrics.bootstrap", "0", "--out_dir", str(out), *extra]


def train_args(tiny_dir, data_file, root, *extra):
    return ["--config", str(ROOT / "configs" / "debug.yaml"), "--model.base.name", tiny_dir, "--data.source", data_file,
            "--data.eval_size", "4", "--data.val_size", "4", "--trainer.default_root_dir", str(root), *extra]


# --- 1. stale answers: a run's identity is the content of what it reads ------------------------------------

def test_an_adapter_retrained_in_place_refuses_the_old_answers(tiny_dir, data_file, tmp_path, capsys):
    run = tmp_path / "train"
    train.main(train_args(tiny_dir, data_file, run))
    out = tmp_path / "eval"
    evaluate.main(eval_args(tiny_dir, data_file, out, "--model.adapter", str(run / "adapter")))
    before = (out / "generations.jsonl").read_text()
    evaluate.main(eval_args(tiny_dir, data_file, out, "--model.adapter", str(run / "adapter")))  # unchanged: resumes
    capsys.readouterr()
    train.main(train_args(tiny_dir, data_file, run, "--model.optim.lr", "0.02"))  # the README's retrain, same directory
    line = refused(evaluate.main, eval_args(tiny_dir, data_file, out, "--model.adapter", str(run / "adapter")), capsys)
    assert "the adapter changed in content" in line and "adapter_content" in line
    assert (out / "generations.jsonl").read_text() == before  # nothing computed is lost


def test_a_data_file_edited_in_place_refuses_the_old_answers(tiny_dir, tmp_path, capsys):
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps(RECORDS))
    evaluate.main(eval_args(tiny_dir, str(data), tmp_path / "eval"))
    capsys.readouterr()
    edited = [dict(r) for r in RECORDS]
    edited[1]["output"] = "Something else entirely."
    data.write_text(json.dumps(edited))
    line = refused(evaluate.main, eval_args(tiny_dir, str(data), tmp_path / "eval"), capsys)
    assert "the data changed in content" in line


def test_a_model_replaced_in_place_refuses_the_old_answers(tmp_path, data_file, capsys):
    from tiny import save_tiny, tiny_model

    model_dir = Path(save_tiny(tmp_path / "model"))
    evaluate.main(eval_args(str(model_dir), data_file, tmp_path / "eval"))
    capsys.readouterr()
    tiny_model("llama", seed=1).save_pretrained(model_dir)  # other weights, same path and config
    assert "the model changed in content" in refused(evaluate.main, eval_args(str(model_dir), data_file, tmp_path / "eval"), capsys)


# --- 2, 4, 6: every option is checked where it is declared, before a model loads -------------------------

EVALUATE_CASES = {
    "sampling at temperature 0": (["--generation.do_sample", "true", "--generation.temperature", "0"],
                                  "generation.temperature = 0.0 is out of range: it must be > 0 when sampling"),
    "negative temperature": (["--generation.temperature", "-1"], "generation.temperature = -1.0 is out of range"),
    "top_p above 1": (["--generation.top_p", "1.5"], "generation.top_p = 1.5 is out of range: it must be in (0, 1]"),
    "limit -1": (["--data.limit", "-1"], "data.limit = -1 is out of range: it must be an integer ≥ 1"),
    "max_length 0": (["--data.max_length", "0"], "data.max_length = 0 is out of range: it must be an integer ≥ 1"),
    "batch_size 0": (["--data.batch_size", "0"], "data.batch_size = 0 is out of range"),
    "max_new_tokens 0": (["--generation.max_new_tokens", "0"], "generation.max_new_tokens = 0 is out of range"),
    "max_new_tokens -5": (["--generation.max_new_tokens", "-5"], "generation.max_new_tokens = -5 is out of range"),
    "bootstrap -1": (["--metrics.bootstrap", "-1"], "metrics.bootstrap = -1 is out of range: it must be ≥ 0"),
}


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_evaluate_refuses_bad_values_before_loading(case, data_file, tmp_path, capsys, monkeypatch):
    import earlyexit.loading

    monkeypatch.setattr(earlyexit.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    extra, message = EVALUATE_CASES[case]
    line = refused(evaluate.main, eval_args("/no/model/needed", data_file, tmp_path / "out", *extra), capsys)
    assert message in line, line
    assert not (tmp_path / "out").exists()


TRAIN_CASES = {
    "lora r 0": (["--model.lora.r", "0"], "lora.r = 0 is out of range: it must be an integer ≥ 1"),
    "negative lr": (["--model.optim.lr", "-0.001"], "optim.lr = -0.001 is out of range: it must be > 0"),
    "batch_size 0": (["--data.batch_size", "0"], "data.batch_size = 0 is out of range"),
    "max_length 0": (["--data.max_length", "0"], "data.max_length = 0 is out of range"),
    "distill above 1": (["--model.loss.distill", "1.5"], "loss.distill = 1.5 is out of range: it must be in [0, 1]"),
    "pull above 1": (["--model.loss.pull", "2"], "loss.pull = 2.0 is out of range: it must be in [0, 1]"),
    "pull without distill": (["--model.loss.pull", "0.5", "--model.loss.distill", "0"],
                             "loss.pull = 0.5 changes the last layer's distillation teacher: set loss.distill > 0"),
    "pull towards the last layer": (["--model.loss.pull", "0.5", "--model.loss.pull_exit", "4"],
                                    "loss.pull_exit 4 is not one of the trained early exits [1, 2, 3]"),
    "exit teacher unknown": (["--model.loss.exit_teacher", "teacher"], "exit_teacher"),
    "exit teacher without distill": (["--model.loss.exit_teacher", "last", "--model.loss.distill", "0"],
                                     "loss.exit_teacher last is a distillation teacher: set loss.distill > 0"),
    "pull with a teacher cache": (["--model.loss.pull", "0.5", "--data.teacher_cache", "/no/cache.safetensors"],
                                  "loss.pull needs the teacher's full distribution"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_bad_values(case, tiny_dir, data_file, tmp_path, capsys):
    extra, message = TRAIN_CASES[case]
    assert message in refused(train.main, train_args(tiny_dir, data_file, tmp_path / "run", *extra), capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_refuses_a_root_dir_that_is_a_file(tiny_dir, data_file, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("")
    line = refused(train.main, train_args(tiny_dir, data_file, file), capsys)
    assert f"trainer.default_root_dir '{file}' is a file, not a directory" in line


# --- 5. lens: see tests/test_lens.py (one prompt verbatim, the list form keeps commas) -------------------

def test_lens_refuses_zero_new_tokens(tiny_dir, tmp_path, capsys):
    line = refused(lens.main, ["--model.name", tiny_dir, "--prompt", "hi", "--max_new_tokens", "0", "--out_dir", str(tmp_path)], capsys)
    assert "max_new_tokens = 0 is out of range" in line


# --- 8. one short line for an unsupported family; a YAML list of exit layers; no resume warning ----------

def test_an_unsupported_family_is_one_short_line(tmp_path, data_file, capsys):
    config = AutoConfig.for_model("t5", vocab_size=128, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2)
    AutoModelForCausalLM  # t5 is not a causal LM: the table refuses it before transformers lists every class
    from transformers import T5ForConditionalGeneration

    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    char_tokenizer().save_pretrained(tmp_path / "t5")
    line = refused(evaluate.main, eval_args(str(tmp_path / "t5"), data_file, tmp_path / "out"), capsys)
    assert "unsupported architecture 't5'; supported model types:" in line and len(line) < 300


def test_exit_layers_take_a_yaml_list(tiny_dir, data_file, tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("exit_layers: [2, 4]\n")
    evaluate.main(["--config", str(config), *eval_args(tiny_dir, data_file, tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [e["layer"] for e in report["layers"]] == [2, 4]


def test_an_exact_resume_does_not_warn_of_unreliable_results(tiny_dir, data_file, tmp_path):
    run = tmp_path / "run"
    train.main(train_args(tiny_dir, data_file, run, "--trainer.max_steps", "3", "--trainer.val_check_interval", "3"))
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train.main(train_args(tiny_dir, data_file, run, "--trainer.max_steps", "4", "--trainer.val_check_interval", "1",
                              "--ckpt_path", str(run / "checkpoints" / "last.ckpt")))
    assert ckpt.is_file()
    assert not [w for w in caught if "not resumable" in str(w.message)]
