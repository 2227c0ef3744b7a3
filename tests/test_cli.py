"""Bad input through the real command line: one clear line on stderr, exit status 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

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
    "unsupported architecture": (["--model.name", "{opt}"], "unsupported architecture 'opt'; supported model types: gemma, gemma2, gpt2"),
    "exit layer 0": (["--exit_layers", "0"], r"exit layer 0 is out of range: this model has layers 1..4"),
    "exit layer above N": (["--exit_layers", "3,9"], r"exit layer 9 is out of range"),
    "missing data file": (["--data.source", "/no/such/alpaca_data.json"], "data file '/no/such/alpaca_data.json' not found"),
    "malformed JSON": (["--data.source", "{bad}"], "malformed JSON at line 2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(paths, case):
    extra, message = CASES[case]
    extra = [e.format(**paths) for e in extra]
    cmd = [sys.executable, "-m", "earlyexit.evaluate", "--model.name", paths["tiny"], "--data.source", paths["good"],
           "--metrics.names", "[bleu]", "--out_dir", f"{paths['out']}/{case}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, proc.stderr
