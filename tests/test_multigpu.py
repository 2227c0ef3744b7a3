"""Two GPUs (skipped elsewhere): FSDP early-exit LoRA training = one GPU on the same global batch, resumes exactly,
exports the full adapter once; sharded evaluation on 2 GPUs = 1 GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import losses, rows

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def run(module: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]


def train_args(root, batch_size, devices, *extra):
    return ["--config", "configs/debug.yaml", "--model.base.device", "cuda", "--trainer.accelerator", "gpu",
            "--trainer.devices", str(devices), *(["--trainer.strategy", "fsdp"] if devices > 1 else []),
            "--model.layer_dropout.p_max", "0", "--model.loss.curriculum", "none", "--data.max_length", "400",
            "--data.batch_size", str(batch_size), "--trainer.logger", "true", "--trainer.val_check_interval", "3",
            "--trainer.default_root_dir", str(root), *extra]


def test_fsdp_training_matches_one_gpu_resumes_and_exports(tmp_path):
    every = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
             f"--trainer.callbacks.dirpath={tmp_path / 'every'}"]
    run("earlyexit.train", *train_args(tmp_path / "one", 4, 1, "--trainer.max_steps", "3"))
    run("earlyexit.train", *train_args(tmp_path / "fsdp", 2, 2, "--trainer.max_steps", "3", *every))
    one, fsdp = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert fsdp[0] == pytest.approx(one[0], rel=1e-5)
    for step in (1, 2):  # Adam amplifies rounding differences in tiny gradients (see test_distributed)
        assert fsdp[step] == pytest.approx(one[step], rel=1e-3), (step, one, fsdp)
    ckpt = torch.load(tmp_path / "every" / "epoch=0-step=2.ckpt", weights_only=True, map_location="cpu")
    state = ckpt["state_dict"]
    assert state and all("lora_" in k for k in state)  # adapter weights only, full (gathered) tensors
    assert all(v.numel() > 0 for v in state.values())
    run("earlyexit.train", *train_args(tmp_path / "resumed", 2, 2, "--trainer.max_steps", "3",
                                       "--ckpt_path", str(tmp_path / "every" / "epoch=0-step=2.ckpt")))
    assert losses(tmp_path / "resumed")[2] == pytest.approx(fsdp[2], rel=1e-5)
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    final = torch.load(tmp_path / "fsdp" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    assert len(exported) == len(final)
    for name, value in final.items():  # lm.base_model.model.X.lora_A.default.weight → base_model.model.X.lora_A.weight
        key = name[len("lm."):].replace(".default", "")
        torch.testing.assert_close(exported[key], value.to(exported[key].dtype))


def test_sharded_evaluation_on_two_gpus_equals_one(tmp_path_factory, tmp_path):
    from tiny import records_file

    data = records_file(tmp_path_factory, [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(13)])
    common = ["--model.name", "tiny-random-llama", "--model.device", "cuda", "--model.dtype", "float32", "--data.source", data,
              "--data.batch_size", "2", "--generation.max_new_tokens", "6", "--metrics.names", "[bleu, rougeL]",
              "--metrics.bootstrap", "0", "--exit_layers", "all"]
    run("earlyexit.evaluate", *common, "--out_dir", str(tmp_path / "one"))
    run("earlyexit.evaluate", *common, "--out_dir", str(tmp_path / "two"), "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert rows(tmp_path / "two" / "generations.jsonl") == rows(tmp_path / "one" / "generations.jsonl")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text())["layers"] for d in ("one", "two"))
    assert a == b
