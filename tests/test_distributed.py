"""Several processes on the CPU (gloo): sharded evaluation = one process exactly, DDP training = one process on the
same global batch, metric states sync, per-rank resume; and the set-ups this machine cannot run are refused."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from earlyexit.data import EpochSampler
from earlyexit.distributed import check_setup, clean_name
from earlyexit.errors import EarlyExitError
from earlyexit.loss import early_exit_loss, exit_weights
from earlyexit.metrics import CorpusBLEU, RougeL
from commands import refusal, refusal_process
from tiny import records_file

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(11)]


def run(module: str, *args: str, devices: int = 1) -> subprocess.CompletedProcess:
    extra = ["--trainer.devices", str(devices), "--trainer.strategy", "ddp"] if devices > 1 else []
    proc = subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: (r["id"], r["layer"]))


def evaluate_args(tiny_dir, data, out):
    return ["--model.name", tiny_dir, "--model.device", "cpu", "--trainer.accelerator", "cpu", "--data.source", data,
            "--data.batch_size", "2", "--generation.max_new_tokens", "6", "--metrics.names", "[bleu, rougeL]",
            "--metrics.bootstrap", "100", "--exit_layers", "all", "--out_dir", str(out)]


@pytest.fixture(scope="module")
def single(tiny_dir, tmp_path_factory):
    """One process over 11 examples × 4 layers."""
    data = records_file(tmp_path_factory, RECORDS)
    out = tmp_path_factory.mktemp("single")
    run("earlyexit.evaluate", *evaluate_args(tiny_dir, data, out))
    return data, out


def test_sharded_evaluation_equals_one_process(tiny_dir, single, tmp_path):
    data, one = single
    run("earlyexit.evaluate", *evaluate_args(tiny_dir, data, tmp_path), devices=2)
    got = rows(tmp_path / "generations.jsonl")
    assert len(got) == 44 and len({(r["id"], r["layer"]) for r in got}) == 44  # 11 (uneven) × 4, none twice
    assert got == rows(one / "generations.jsonl")
    assert not list(tmp_path.glob("generations.rank*"))  # folded into one file
    ours, theirs = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path, one))
    assert ours["layers"] == theirs["layers"] and ours["example_ids"] == theirs["example_ids"]


def test_a_sharded_run_resumes_from_its_rank_files(tiny_dir, single, tmp_path):
    data, one = single
    done = rows(one / "generations.jsonl")
    (tmp_path / "run.json").write_text((one / "run.json").read_text())
    # killed mid-run: each rank had written part of its shard, one line torn
    for rank, part in ((0, done[:9]), (1, done[20:26])):
        text = "".join(json.dumps(r) + "\n" for r in part)
        (tmp_path / f"generations.rank{rank}.jsonl").write_text(text + ('{"id": 3, "la' if rank else ""))
    run("earlyexit.evaluate", *evaluate_args(tiny_dir, data, tmp_path), devices=2)
    assert rows(tmp_path / "generations.jsonl") == done
    assert json.loads((tmp_path / "metrics.json").read_text())["layers"] == json.loads((one / "metrics.json").read_text())["layers"]


def test_metric_states_sync_across_processes(tmp_path):
    pairs = [[f"the number is {i} or so", f"The number is {i}."] for i in range(7)] + [["", "empty"], ["a b c", "a b d"]]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = ROOT / "tests" / "dist_metrics_worker.py"
    procs = [subprocess.Popen([sys.executable, str(worker), str(tmp_path / "pairs.json"), str(tmp_path / "out.json")], cwd=ROOT,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    synced = json.loads((tmp_path / "out.json").read_text())
    hyps, refs = [h for h, _ in pairs], [r for _, r in pairs]
    for name, metric in (("bleu", CorpusBLEU()), ("rougeL", RougeL())):
        metric.update(hyps, refs)
        assert synced[name] == pytest.approx(float(metric.compute()), abs=1e-12), name


def train_args(root, batch_size, *extra):
    return ["--config", "configs/debug.yaml", "--model.layer_dropout.p_max", "0", "--model.loss.curriculum", "none",
            "--data.max_length", "400", "--data.batch_size", str(batch_size), "--trainer.logger", "true",
            "--trainer.val_check_interval", "3", "--trainer.default_root_dir", str(root), *extra]


def losses(root: Path) -> dict[int, float]:
    (path,) = root.glob("lightning_logs/version_0/metrics.csv")
    with path.open() as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]}


def test_ddp_training_matches_one_process_and_resumes(tmp_path):
    run("earlyexit.train", *train_args(tmp_path / "one", 4, "--trainer.max_steps", "3"))
    every = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
             f"--trainer.callbacks.dirpath={tmp_path / 'every'}"]
    run("earlyexit.train", *train_args(tmp_path / "ddp", 2, "--trainer.max_steps", "3", *every), devices=2)
    one, ddp = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert sorted(one) == [0, 1, 2] and all(v > 0 for v in one.values())
    # the same global batch of 4 and the loss over its tokens: step 0 equal up to float summation order; later
    # steps drift a little, since Adam's normalised update amplifies those rounding differences in tiny gradients
    assert ddp[0] == pytest.approx(one[0], rel=1e-6)
    for step in (1, 2):
        assert ddp[step] == pytest.approx(one[step], rel=1e-3), (step, one, ddp)
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()
    # resumed under DDP from its step-2 checkpoint, the run continues exactly
    ckpt = tmp_path / "every" / "epoch=0-step=2.ckpt"
    run("earlyexit.train", *train_args(tmp_path / "resumed", 2, "--trainer.max_steps", "3", "--ckpt_path", str(ckpt)), devices=2)
    assert losses(tmp_path / "resumed")[2] == pytest.approx(ddp[2], rel=1e-4)


def test_global_token_normalisation_makes_rank_losses_average_to_the_global_loss():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 11)
    head = lambda h, layer: linear(h)  # noqa: E731 (the loss's head takes the exit layer too)
    hidden = {2: torch.randn(4, 6, 8)}
    labels = torch.randint(0, 11, (4, 6))
    labels[0, :4] = -100  # uneven answer lengths across the two halves
    labels[3, :2] = -100
    weights = exit_weights([2], 2, "uniform")
    whole = early_exit_loss(hidden, labels, head, weights).total
    global_tokens = int((labels[:, 1:] != -100).sum())
    halves = [early_exit_loss({2: hidden[2][s]}, labels[s], head, weights, tokens=global_tokens / 2).total
              for s in (slice(0, 2), slice(2, 4))]
    assert float((halves[0] + halves[1]) / 2) == pytest.approx(float(whole), rel=1e-6)


def test_epoch_sampler_gives_each_rank_its_block_of_every_global_batch():
    one = list(EpochSampler(11, seed=3, batch_size=4))
    ranks = [list(EpochSampler(11, seed=3, batch_size=2, rank=r, world=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]  # 2 global batches of 4; the partial third is dropped
    for step in range(2):
        assert ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2] == one[4 * step : 4 * step + 4]
    resumed = EpochSampler(11, seed=3, batch_size=2, rank=1, world=2)
    resumed.start = 2
    assert list(resumed) == ranks[1][2:]
    assert isinstance(resumed, torch.utils.data.DistributedSampler)  # so Lightning does not wrap it


@pytest.mark.parametrize("args,message", [
    (("cpu", 64, "ddp"), "trainer.devices 64: this machine has"),
    (("gpu", 1, "auto"), "this machine has no CUDA GPU"),
    (("cpu", 2, "fsdp"), "runs on CUDA GPUs only; on CPUs use ddp"),
    (("cpu", 2, "deepspeed"), "needs the deepspeed package"),
    (("cpu", 2, "dpp"), "'dpp' is not a Lightning strategy"),
    (("cpu", 2, {"class_path": "lightning.pytorch.strategies.FSDPStrategy"}), "runs on CUDA GPUs only"),
])
def test_setups_this_machine_cannot_run(args, message):
    if "deepspeed" in args and __import__("importlib").util.find_spec("deepspeed"):
        pytest.skip("deepspeed is installed here")
    if torch.cuda.is_available() and args[0] == "gpu":
        pytest.skip("this machine has a GPU")
    with pytest.raises(EarlyExitError, match=message):
        check_setup(*args)


def test_setups_this_machine_can_run():
    check_setup("cpu", 2, "ddp")
    check_setup("auto", "auto", "auto")


@pytest.mark.parametrize("module,args,message", [
    ("earlyexit.train", ["--config", "configs/debug.yaml", "--trainer.devices", "64"], "trainer.devices 64: this machine has"),
    ("earlyexit.train", ["--config", "configs/debug.yaml", "--trainer.strategy", "fsdp"], "runs on CUDA GPUs only"),
    ("earlyexit.evaluate", ["--model.name", "tiny-random-llama", "--trainer.strategy", "fsdp"], "runs on CUDA GPUs only"),
])
def test_cli_refuses_clearly(module, args, message, monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert message in refusal(module.split(".")[1], args, monkeypatch, capsys)


def test_a_real_process_refuses_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    last = refusal_process("earlyexit.train", ["--config", "configs/debug.yaml", "--trainer.devices", "64"])
    assert "trainer.devices 64: this machine has" in last


def test_clean_name():
    assert clean_name("lm._fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.w") == "lm.model.layers.0.mlp.w"


def test_fsdp_units_get_one_dtype():
    from earlyexit.distributed import uniform_dtype

    model = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)
    assert uniform_dtype(model) == torch.float32
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and all(p.requires_grad for p in model[1].parameters())
    assert uniform_dtype(model) is None  # already uniform


def test_each_rank_loads_onto_its_own_gpu(monkeypatch):
    from earlyexit.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index wins
    monkeypatch.setenv("LOCAL_RANK", "3")  # one GPU visible per task (SLURM): modulo the visible count
    assert resolve_device("cuda") == torch.device("cuda", 1)
