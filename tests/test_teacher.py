"""The teacher cache: top-k teacher log-probabilities built once equal the teacher pass they replace (k = V), padded
or packed, and a cache of other examples is refused."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from earlyexit.data import AlpacaDataModule
from earlyexit.errors import EarlyExitError
from earlyexit.loading import ModelArgs
from earlyexit.loss import SparseTeacher, early_exit_loss, exit_weights
from earlyexit.module import EarlyExitModule, ExitLossArgs, LoraArgs
from tiny import VOCAB, tiny_model

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} and {i * 7} again."} for i in range(48)]


def test_sparse_teacher_with_every_token_is_the_dense_kl():
    from earlyexit.model import EarlyExitHead

    ee = EarlyExitHead(tiny_model("llama"))
    ids = torch.randint(3, 100, (3, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    hidden = ee.hidden_states(ids)
    keep = labels[:, 1:] != -100
    dense = torch.log_softmax(torch.randn(int(keep.sum()), VOCAB), -1)
    top = dense.topk(VOCAB, -1)
    weights = exit_weights([2, 4], 4, "uniform")
    a = early_exit_loss(hidden, labels, ee.exit_logits, weights, dense, alpha=0.6, chunk_size=7)
    b = early_exit_loss(hidden, labels, ee.exit_logits, weights, SparseTeacher(top.indices.int(), top.values), alpha=0.6,
                        chunk_size=7)
    torch.testing.assert_close(a.total, b.total)
    few = SparseTeacher(top.indices[:, :5], top.values[:, :5])
    assert float(few.kl(dense).sum()) <= float(SparseTeacher(top.indices, top.values).kl(dense).sum()) + 1e-6


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("teacher")
    data = root / "alpaca_data.json"
    data.write_text(json.dumps(RECORDS))
    cache = root / "teacher.safetensors"
    cmd = [sys.executable, str(ROOT / "scripts" / "teacher_cache.py"), "--model.name", tiny_dir, "--model.device", "cpu",
           "--source", str(data), "--template", "alpaca", "--eval_size", "4", "--val_size", "4", "--max_length", "256",
           "--top_k", str(VOCAB), "--out", str(cache)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"data": str(data), "cache": str(cache), "root": root}


@pytest.mark.parametrize("pack", [False, True])
def test_a_cached_teacher_gives_the_loss_of_the_teacher_pass(setup, tiny_dir, pack):
    torch.manual_seed(0)
    module = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), lora=LoraArgs(r=2),
                             loss=ExitLossArgs(exit_layers="all", distill=0.5))
    with torch.no_grad():  # the student differs from the teacher (LoRA off)
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    options = dict(template="alpaca", eval_size=4, val_size=4, max_length=256, batch_size=6, pack=pack)
    plain = AlpacaDataModule(setup["data"], **options)
    cached = AlpacaDataModule(setup["data"], **options, teacher_cache=setup["cache"])
    for dm in (plain, cached):
        dm.attach_tokenizer(module.tokenizer)
        dm.setup("fit")
    examples = plain.train_set[:6]
    with_pass = plain.collate_train(examples)
    from_cache = cached.collate_train(cached.train_set[:6])
    assert "teacher_ids" in from_cache and "teacher_ids" not in with_pass
    ref, _ = module._loss(with_pass, step=0, train=True)
    got, _ = module._loss(from_cache, step=0, train=True)
    torch.testing.assert_close(got.total, ref.total, atol=1e-5, rtol=1e-5)
    for layer in ref.per_exit:
        torch.testing.assert_close(got.per_exit[layer], ref.per_exit[layer])


def test_a_cache_of_other_examples_is_refused(setup, tiny_dir):
    from earlyexit.loading import load_tokenizer
    from earlyexit.names import resolve_model_path

    other = setup["root"] / "other.json"
    other.write_text(json.dumps([{**r, "output": r["output"].upper()} for r in RECORDS]))
    dm = AlpacaDataModule(str(other), template="alpaca", eval_size=4, val_size=4, max_length=256,
                          teacher_cache=setup["cache"])  # other answers: other tokenised examples
    dm.attach_tokenizer(load_tokenizer(resolve_model_path(tiny_dir)))
    with pytest.raises(EarlyExitError, match="lacks .* training examples: it was built for other data options"):
        dm.setup("fit")
    with pytest.raises(EarlyExitError, match="not found"):  # before any model or data loads
        AlpacaDataModule(setup["data"], teacher_cache=str(setup["root"] / "none.safetensors"))


def test_the_train_command_reads_the_cache(setup, tiny_dir, tmp_path):
    from earlyexit.train import main

    main(["--config", str(ROOT / "configs" / "debug.yaml"), "--model.base.name", tiny_dir, "--data.source", setup["data"],
          "--data.eval_size", "4", "--data.val_size", "4", "--data.teacher_cache", setup["cache"],
          "--trainer.default_root_dir", str(tmp_path)])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
