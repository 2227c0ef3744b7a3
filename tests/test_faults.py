"""Faults a real user makes (issue #36), injected one kind at a time: each is refused with a non-zero exit and one clear
last line, before the model loads where it can be, and nothing already written is lost or duplicated. One real process
per command kind checks that no traceback reaches the user."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from commands import ROOT, refusal, refusal_process, run_command
from tiny import records_file, save_tiny

RECORDS = [{"instruction": f"Say {i}.", "input": "", "output": f"It is {i}."} for i in range(6)]
LONG = [{"instruction": "Repeat: " + "words " * 60, "input": "", "output": "words"}] + RECORDS


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return records_file(tmp_path_factory, RECORDS)


@pytest.fixture(scope="module")
def long_file(tmp_path_factory):
    return records_file(tmp_path_factory, LONG)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny models saved as directories: llama (seed 0), llama with other weights (seed 1), qwen2 (the same shapes as
    the llama) and gpt2 (other module names)."""
    root = tmp_path_factory.mktemp("models")
    return {name: save_tiny(root / name, family, seed) for name, family, seed in
            (("llama", "llama", 0), ("llama_other", "llama", 1), ("qwen2", "qwen2", 0), ("gpt2", "gpt2", 0))}


def lora_adapter(model_dir: str, target: Path, record: bool = True) -> str:
    """A LoRA adapter of the model in ``model_dir`` (random B, so it changes the model), with the record training writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from earlyexit.provenance import record_base

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft.save_pretrained(target)
    if record:
        record_base(target, model.config, model_dir)
    return str(target)


def evaluate_args(model: str, data: str, out: Path, *extra) -> list[str]:
    return ["--model.name", model, "--model.device", "cpu", "--data.source", data, "--data.limit", "4",
            "--data.batch_size", "2", "--generation.max_new_tokens", "6", "--metrics.names", "[rougeL]",
            "--metrics.bootstrap", "0", "--exit_layers", "2,4", "--out_dir", str(out), *extra]


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the refusal must come first."""
    import earlyexit.evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(earlyexit.evaluate, "EarlyExitModule", refuse)


# --- wrong or broken weights -------------------------------------------------------------------------------------


def test_an_adapter_on_another_model_is_refused_naming_both(models, data_file, tmp_path, monkeypatch, capsys, no_model_load):
    adapter = lora_adapter(models["llama"], tmp_path / "adapter")
    line = refusal("evaluate", evaluate_args(models["qwen2"], data_file, tmp_path / "out", "--model.adapter", adapter),
                   monkeypatch, capsys)
    assert f"adapter {adapter!r} was trained on {models['llama']} (llama, 4 layers, width 32)" in line
    assert f"--model.name {models['qwen2']} (qwen2, 4 layers, width 32) is another model" in line
    assert not (tmp_path / "out" / "generations.jsonl").exists()


def test_an_adapter_on_other_weights_of_its_shape_needs_other_base_and_warns(models, data_file, tmp_path, monkeypatch,
                                                                          capsys):
    adapter = lora_adapter(models["llama"], tmp_path / "adapter")
    common = evaluate_args(models["llama_other"], data_file, tmp_path / "out", "--model.adapter", adapter)
    line = refusal("evaluate", common, monkeypatch, capsys)
    assert "has the same shapes but other weights" in line and "--model.other_base true" in line
    assert run_command("evaluate", [*common, "--model.other_base", "true"], monkeypatch) == 0
    assert "warning: adapter" in capsys.readouterr().err
    assert (tmp_path / "out" / "metrics.json").is_file()


def test_an_adapter_without_a_record_that_does_not_fit_is_refused_in_one_line(models, data_file, tmp_path, monkeypatch,
                                                                             capsys):
    adapter = lora_adapter(models["llama"], tmp_path / "adapter", record=False)  # an older adapter, or another tool's
    line = refusal("evaluate", evaluate_args(models["gpt2"], data_file, tmp_path / "out", "--model.adapter", adapter),
                   monkeypatch, capsys)
    assert f"adapter {adapter!r} does not fit model {models['gpt2']!r}" in line


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_a_weight_file_cut_short_is_named_before_anything_loads(models, data_file, tmp_path, monkeypatch, capsys,
                                                               no_model_load):
    from earlyexit.probe import ExitProbe

    adapter = lora_adapter(models["llama"], tmp_path / "adapter")
    cut(Path(adapter) / "adapter_model.safetensors")
    line = refusal("evaluate", evaluate_args(models["llama"], data_file, tmp_path / "out", "--model.adapter", adapter),
                   monkeypatch, capsys)
    assert f"adapter_model.safetensors' is broken: cut short (" in line and "write it again" in line
    ExitProbe([1, 2], 32).save(tmp_path / "probe")
    cut(tmp_path / "probe" / "exit_probe.safetensors", 0.3)
    line = refusal("evaluate", evaluate_args(models["llama"], data_file, tmp_path / "out", "--generation.exit", "dynamic",
                                             "--generation.measure", "learned", "--generation.probe",
                                             str(tmp_path / "probe")), monkeypatch, capsys)
    assert "generation.probe: weight file" in line and "exit_probe.safetensors' is broken" in line
    (tmp_path / "header").mkdir()
    (tmp_path / "header" / "exit_probe.json").write_text('{"layers": [1], "hidden_size": 32}')
    (tmp_path / "header" / "exit_probe.safetensors").write_bytes(b"\x10\x00")
    line = refusal("evaluate", evaluate_args(models["llama"], data_file, tmp_path / "out", "--generation.exit", "dynamic",
                                             "--generation.measure", "learned", "--generation.probe",
                                             str(tmp_path / "header")), monkeypatch, capsys)
    assert "its header is cut short (2 bytes)" in line


def test_a_checkpoint_a_tuned_lens_and_a_cached_conversion_cut_short(models, data_file, tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, checkpoint)
    cut(checkpoint)
    line = refusal("train", ["--config", str(ROOT / "configs" / "debug.yaml"), "--model.base.name", models["llama"],
                             "--data.source", data_file, "--trainer.default_root_dir", str(tmp_path / "run"),
                             "--ckpt_path", str(checkpoint)], monkeypatch, capsys)
    assert "checkpoint" in line and "is broken: cut short" in line and "resume from an earlier one" in line
    lens = tmp_path / "lens.pt"
    torch.save({"n_layers": 4}, lens)
    cut(lens)
    line = refusal("lens", ["--model.name", models["llama"], "--prompt", "hi", "--tuned.path", str(lens),
                            "--out_dir", str(tmp_path / "lens")], monkeypatch, capsys)
    assert "tuned lens file" in line and "is broken" in line
    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    from earlyexit.loading import ModelArgs, load_model

    load_model(ModelArgs(name="tiny-random-llama", device="cpu"))  # converted once into the cache
    weights = next((tmp_path / "cache" / "tiny-random-llama").glob("*.safetensors"))
    cut(weights)
    line = refusal("evaluate", evaluate_args("tiny-random-llama", data_file, tmp_path / "out"), monkeypatch, capsys)
    assert "is broken: cut short" in line and f"remove {tmp_path / 'cache' / 'tiny-random-llama'} and it is made again" in line


# --- prompts past the context ------------------------------------------------------------------------------------


def test_a_prompt_past_the_window_is_refused_before_the_model_loads_or_cut_with_a_warning(models, long_file, tmp_path,
                                                                                      monkeypatch, capsys, no_model_load):
    args = evaluate_args(models["gpt2"], long_file, tmp_path / "out", "--generation.max_new_tokens", "40")
    line = refusal("evaluate", args, monkeypatch, capsys)  # gpt2: learned positions, 256 of them
    assert "1 evaluation prompt(s) do not fit the model's window of 256 tokens with max_new_tokens 40" in line
    assert "set generation.context truncate" in line and not (tmp_path / "out" / "generations.jsonl").exists()
    monkeypatch.undo()
    assert run_command("evaluate", [*args, "--generation.context", "truncate"], monkeypatch) == 0
    err = capsys.readouterr().err
    assert "warning: 1 evaluation prompt(s) cut from the left to their last 216 tokens" in err and "tokens dropped" in err
    rows = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({(r["id"], r["layer"]) for r in rows}) == 8


def test_bench_and_the_server_hold_prompts_to_the_window(models, long_file, tmp_path, monkeypatch, capsys):
    line = refusal("bench", ["--model.name", models["gpt2"], "--model.device", "cpu", "--data", long_file, "--batch", "2",
                             "--generation.max_new_tokens", "40", "--modes", "[full]", "--repeats", "1"], monkeypatch, capsys)
    assert "1 benchmark prompt(s) do not fit the model's window of 256 tokens" in line
    import http.client
    import threading

    from earlyexit.loading import ModelArgs, load_model
    from earlyexit.serve import ChatModel, make_server

    lm, tokenizer = load_model(ModelArgs(name=models["llama"], device="cpu"))
    messages = [{"role": "user", "content": "words " * 60}]
    for context, status in (("refuse", 400), ("truncate", 200)):
        server = make_server(ChatModel(lm, tokenizer, "tiny", max_tokens=4, context=context), "127.0.0.1", 0,
                             max_body_bytes=4096)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            body = json.dumps({"model": "tiny", "messages": messages, "max_tokens": 200})
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = json.loads(response.read())
            assert response.status == status, payload
            if status == 400:
                assert payload["error"]["code"] == "context_length_exceeded"
            conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
            conn.putrequest("POST", "/v1/chat/completions")  # a body over the limit: answered unread
            conn.putheader("Content-Length", "5000000")
            conn.endheaders()
            started = time.perf_counter()
            response = conn.getresponse()
            payload = json.loads(response.read())
            assert response.status == 400 and payload["error"]["code"] == "request_too_large"
            assert "over the server's limit of 4,096" in payload["error"]["message"] and time.perf_counter() - started < 5
        finally:
            server.shutdown()
            server.server_close()
    assert "warning: 1 request prompt(s) cut from the left" in capsys.readouterr().err


# --- two runs into one results directory ---------------------------------------------------------------------------


HOLDER = """
import sys, time
from earlyexit.results import ResultsDir
ResultsDir(sys.argv[1], {"a": 1})
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_a_directory_in_use_is_refused_and_a_killed_one_resumes(models, data_file, tmp_path,
                                                                                  monkeypatch, capsys, no_model_load):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        line = refusal("evaluate", evaluate_args(models["llama"], data_file, out), monkeypatch, capsys)
        assert f"results directory {str(out)!r} is being written by another run (process {holder.pid} on " in line
        assert "wait for it to end, or choose another --out_dir" in line
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # killed: its lock goes with it
        holder.wait()
    monkeypatch.undo()
    (out / "run.json").unlink()  # the holder's own (no answers): our run takes the directory
    assert run_command("evaluate", evaluate_args(models["llama"], data_file, out), monkeypatch) == 0
    assert run_command("evaluate", evaluate_args(models["llama"], data_file, out), monkeypatch) == 0  # resumed: all done
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({(r["id"], r["layer"]) for r in rows}) == 8  # each (record, layer) once


def test_an_unwritable_results_directory_is_refused_before_the_model_loads(models, data_file, tmp_path, monkeypatch,
                                                                          capsys, no_model_load):
    (tmp_path / "file").write_text("")
    line = refusal("evaluate", evaluate_args(models["llama"], data_file, tmp_path / "file" / "out"), monkeypatch, capsys)
    assert "is not writable" in line
    monkeypatch.setattr("earlyexit.module.load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    line = refusal("train", ["--config", str(ROOT / "configs" / "debug.yaml"), "--model.base.name", models["llama"],
                             "--data.source", data_file, "--trainer.default_root_dir", str(tmp_path / "file" / "run")],
                   monkeypatch, capsys)
    assert f"trainer.default_root_dir {str(tmp_path / 'file' / 'run')!r} is not writable" in line


# --- a config value of the wrong type ------------------------------------------------------------------------------


def test_a_wrong_type_in_a_yaml_config_is_one_line_naming_key_value_and_type(models, data_file, tmp_path, monkeypatch,
                                                                            capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("data:\n  batch_size: one\n")
    line = refusal("evaluate", ["--config", str(config)], monkeypatch, capsys)
    assert line == "error: data.batch_size = 'one': expected an integer"
    config.write_text("trainer:\n  max_steps: one\n")
    line = refusal("train", ["--config", str(ROOT / "configs" / "debug.yaml"), "--config", str(config)], monkeypatch, capsys)
    assert line == "error: trainer.max_steps = 'one': expected an integer"
    line = refusal("evaluate", ["--generation.measure", "nope"], monkeypatch, capsys)
    assert line == "error: generation.measure = 'nope': expected one of softmax, margin, state, learned"


# --- as a user sees it: one real process per command, no traceback -------------------------------------------------


def test_real_processes_refuse_without_a_traceback(models, data_file, tmp_path):
    adapter = lora_adapter(models["llama"], tmp_path / "adapter")
    line = refusal_process("earlyexit.evaluate", evaluate_args(models["qwen2"], data_file, tmp_path / "e",
                                                               "--model.adapter", adapter))
    assert "was trained on" in line
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: one\n")
    line = refusal_process("earlyexit.train", ["--config", str(ROOT / "configs" / "debug.yaml"),
                                               "--config", str(tmp_path / "bad.yaml")])
    assert line == "error: trainer.max_steps = 'one': expected an integer"
