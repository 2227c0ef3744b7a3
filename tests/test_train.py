"""Early-exit LoRA training: smoke run, adapter export and reload, exact resume, refusals."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.testing import assert_close

from earlyexit.data import AlpacaDataModule
from earlyexit.errors import EarlyExitError
from earlyexit.loading import ModelArgs, load_model
from earlyexit.model import EarlyExitHead
from earlyexit.module import EarlyExitModule, ExitLossArgs, LayerDropoutArgs, LoraArgs, OptimArgs
from earlyexit.train import main
from commands import refusal_process, run_command
from tiny import records_file

ROOT = Path(__file__).resolve().parents[1]
RECORDS = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i} {i}."} for i in range(40)]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return records_file(tmp_path_factory, RECORDS)


def cli_args(tiny_dir, data_file, root, *extra):
    return ["--config", str(ROOT / "configs" / "debug.yaml"), "--model.base.name", tiny_dir,
            "--data.source", data_file, "--trainer.default_root_dir", str(root), *extra]


def test_two_step_smoke_run_exports_an_adapter_that_reloads_to_identical_logits(tiny_dir, data_file, tmp_path):
    main(cli_args(tiny_dir, data_file, tmp_path))
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(p.stat().st_size < 200_000 for p in ckpts)  # adapter weights only
    state = torch.load(ckpts[0], map_location="cpu", weights_only=False)
    assert state["global_step"] == 2 and all("lora" in k for k in state["state_dict"])
    module = EarlyExitModule.load_from_checkpoint(ckpts[0], map_location="cpu")
    base = json.loads((tmp_path / "adapter" / "base_model.json").read_text())  # what it was trained on (provenance)
    assert base["name"] == tiny_dir and base["model_type"] == "llama" and base["content"].startswith("sha256:")
    loaded, _ = load_model(ModelArgs(name=tiny_dir, device="cpu", adapter=str(tmp_path / "adapter")))
    ids = torch.randint(3, 100, (2, 9))
    module.eval()
    for layer in (1, 4):
        assert_close(EarlyExitHead(loaded)(ids, exit_layer=layer), module.ee(ids, exit_layer=layer))
    base, _ = load_model(ModelArgs(name=tiny_dir, device="cpu"))
    assert not torch.allclose(EarlyExitHead(base)(ids, exit_layer=1), module.ee(ids, exit_layer=1))  # it trained


def test_debug_config_runs_as_shipped_and_its_adapter_moves(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("EARLYEXIT_CACHE", str(tmp_path / "cache"))
    main(["--config", str(ROOT / "configs" / "debug.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    assert (tmp_path / "cache" / "tiny-random-llama" / "config.json").is_file()
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    b_mats = {k: v for k, v in weights.items() if "lora_B" in k}
    assert b_mats and all(v.abs().sum() > 0 for v in b_mats.values())  # LoRA B starts at zero: every one moved


def test_examples_without_an_answer_token_are_skipped_and_counted(tmp_path):
    from earlyexit.tokens import supervised_tokens
    from tiny import char_tokenizer

    long_prompt = [{"instruction": "x" * 400, "input": "", "output": "y"}] * 5
    fine = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(12)]
    path = tmp_path / "alpaca_data.json"
    path.write_text(__import__("json").dumps(fine[:2] + long_prompt + fine[2:]))
    data = AlpacaDataModule(str(path), template="alpaca", eval_size=2, val_size=2, max_length=250, batch_size=2)
    data.attach_tokenizer(char_tokenizer())
    data.setup("fit")
    assert data.no_answer == 5 and len(data.train_set) + len(data.val_set) == 10
    assert all(supervised_tokens(e) > 0 for e in data.train_set + data.val_set)
    tight = AlpacaDataModule(str(path), template="alpaca", eval_size=2, val_size=2, max_length=100, batch_size=2)
    tight.attach_tokenizer(char_tokenizer())
    with pytest.raises(EarlyExitError, match="have an answer token within data.max_length=100.*nothing would train"):
        tight.setup("fit")


class Losses(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def fit(tiny_dir, data_file, root, max_steps, ckpt_path=None, compile_blocks=False, gradient_checkpointing=False,
        calls=None):
    """``calls``: with ``gradient_checkpointing``, a list that gets one item each time the first block runs under
    activation checkpointing."""
    torch.manual_seed(0)
    module = EarlyExitModule(
        base=ModelArgs(name=tiny_dir, device="cpu"), lora=LoraArgs(r=4, alpha=8),
        loss=ExitLossArgs(exit_layers="all", curriculum="rotational", distill=0.3),
        layer_dropout=LayerDropoutArgs(p_max=0.3, seed=1), optim=OptimArgs(lr=3e-3, warmup_steps=2),
        compile_blocks=compile_blocks, gradient_checkpointing=gradient_checkpointing,
    )
    if calls is not None:
        block = module.ee.blocks[0]
        checkpoint = block._gradient_checkpointing_func
        block._gradient_checkpointing_func = lambda *args, **kwargs: (calls.append(1), checkpoint(*args, **kwargs))[1]
    data = AlpacaDataModule(data_file, template="alpaca", eval_size=4, val_size=4, batch_size=4, max_length=200)
    data.attach_tokenizer(module.tokenizer)
    losses = Losses()
    every = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[losses, every], default_root_dir=root)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    assert not any("forward" in block.__dict__ for block in module.ee.blocks)  # plain again after fit
    return losses.losses


def test_resume_from_a_mid_run_checkpoint_reproduces_the_next_losses(tiny_dir, data_file, tmp_path):
    # 32 training records / batch 4 = 8 batches an epoch: the checkpoint at step 3 is mid-epoch, and the
    # run goes on into a second epoch.
    full = fit(tiny_dir, data_file, tmp_path / "full", max_steps=11)
    resumed = fit(tiny_dir, data_file, tmp_path / "resumed", max_steps=11, ckpt_path=str(tmp_path / "full" / "step=3.ckpt"))
    assert sorted(resumed) == list(range(4, 12))
    for step in resumed:
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), step



def test_gradient_checkpointing_acts_under_the_trainer(tiny_dir, data_file, tmp_path):
    """``gradient_checkpointing``: under Lightning's fit (which leaves the loaded model in eval mode) the blocks of
    every training step run checkpointed (it used to be silently off), and the losses are the plain run's."""
    calls = []
    plain = fit(tiny_dir, data_file, tmp_path / "plain", max_steps=2)
    checkpointed = fit(tiny_dir, data_file, tmp_path / "ckpt", max_steps=2, gradient_checkpointing=True, calls=calls)
    assert len(calls) >= 2  # the first block, checkpointed in both steps (the teacher pass has no gradients: plain)
    for step in plain:
        assert checkpointed[step] == pytest.approx(plain[step], rel=1e-5), step

def test_layer_dropout_only_in_training(tiny_dir):
    module = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), lora=LoraArgs(r=2),
                             layer_dropout=LayerDropoutArgs(p_max=1.0, scale="uniform"))
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(module.ee.blocks, 1)]
    ids = torch.randint(3, 100, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    module.training_step(batch, 0)
    assert ran == [1]  # p = 1 everywhere: every block but the first is skipped
    ran.clear()
    module.validation_step(batch, 0)
    assert ran == [1, 2, 3, 4]
    for h in hooks:
        h.remove()


def test_nan_loss_stops_with_the_step(tiny_dir, monkeypatch):
    module = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), lora=LoraArgs(r=2))
    ids = torch.randint(3, 100, (2, 8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        module.ee.head.weight.fill_(float("nan"))
    with pytest.raises(EarlyExitError, match="the training loss is nan at step 0"):
        module.training_step(batch, 0)


@pytest.mark.parametrize("extra, message", [
    (["--model.lora.nonexistent", "1"], "nonexistent"),
    (["--model.lora.target_modules", "[q_proj, w_gate]"], "LoRA target 'w_gate' is not a module"),
    (["--model.loss.exit_layers", "2,9"], "exit layer 9 is out of range"),
    (["--ckpt_path", "/no/such.ckpt"], "checkpoint '/no/such.ckpt' not found"),
    (["--model.full_finetune", "true"], "model.full_finetune trains the blocks' own weights: set model.lora null"),
    (["--model.lora", "null", "--model.loss.distill", "0"], "nothing to train"),
])
def test_bad_input(tiny_dir, data_file, tmp_path, extra, message, monkeypatch, capsys):
    assert run_command("train", cli_args(tiny_dir, data_file, tmp_path, *extra), monkeypatch) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err[-2000:]


def test_bad_input_in_a_real_process(tiny_dir, data_file, tmp_path):
    last = refusal_process("earlyexit.train", cli_args(tiny_dir, data_file, tmp_path, "--ckpt_path", "/no/such.ckpt"))
    assert "checkpoint '/no/such.ckpt' not found" in last


def test_full_finetuning_trains_the_blocks_only_against_a_frozen_copy_and_exports_the_model(tiny_dir, data_file, tmp_path):
    main(cli_args(tiny_dir, data_file, tmp_path, "--model.lora", "null", "--model.full_finetune", "true",
                  "--model.layer_dropout.p_max", "0", "--model.optim.lr", "0.01", "--trainer.max_steps", "3"))
    base, _ = load_model(ModelArgs(name=tiny_dir, device="cpu"))
    tuned, _ = load_model(ModelArgs(name=str(tmp_path / "model"), device="cpu"))  # the exported model
    moved = {name for name, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[name])}
    blocks = EarlyExitHead(tuned).spec.layers
    assert moved and all(name.startswith(blocks + ".") for name in moved)  # embeddings, final norm, head untouched
    assert not (tmp_path / "adapter").exists()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["state_dict"] and all(".layers." in k and "teacher" not in k for k in ckpt["state_dict"])


def test_full_finetuning_distils_from_the_model_as_loaded(tiny_dir):
    """The teacher is the model as loaded, its log-probabilities filled 5 rows at a time (16 rows: a short last chunk)."""
    module = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), full_finetune=True,
                             loss=ExitLossArgs(exit_layers="all", distill=0.5, chunk_size=5))
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".layers." in name and "teacher" not in name for name in trainable)
    with torch.no_grad():
        for p in module.ee.blocks.parameters():
            p.add_(0.1)  # the student moves; the teacher must not
    ids = torch.randint(3, 100, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    base, _ = load_model(ModelArgs(name=tiny_dir, device="cpu"))
    expected = torch.log_softmax(EarlyExitHead(base)(ids)[:, :-1].reshape(-1, base.config.vocab_size).float(), -1)
    assert_close(module._teacher(batch), expected)


@pytest.mark.parametrize("fused,exit_teacher", [(False, "base"), (True, "base"), (False, "last"), (True, "last")])
def test_pull_distils_the_last_layer_towards_the_exit(tiny_dir, fused, exit_teacher):
    """loss.pull β: the last layer's teacher is the normalised base^(1−β) · exit^β (the exit detached); the exits keep
    the base teacher, or with loss.exit_teacher last learn the trained model's own last layer (detached). Loss and
    gradients equal a naive computation in probability space."""
    module = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), lora=LoraArgs(r=2),
                             loss=ExitLossArgs(exit_layers="2", weights="uniform", distill=0.5, pull=0.3, fused=fused,
                                               exit_teacher=exit_teacher, chunk_size=5))  # 12 rows: 3 chunks
    assert module.pull_exit == 2
    with torch.no_grad():  # LoRA's B starts at zero; move it so the trained model differs from its base
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def grads(loss):
        module.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in module.parameters() if p.grad is not None]

    out, _ = module._loss(batch, 0, train=True)
    ours = grads(out.total)
    keep = labels[:, 1:] != -100
    tgt = labels[:, 1:][keep]
    base = module._teacher(batch).exp()  # [M, V] probabilities of the base model's last layer
    hidden = module.ee.hidden_states(ids, exit_layers=[2, 4])
    logp = {layer: torch.log_softmax(module.ee.exit_logits(hidden[layer][:, :-1][keep], layer).float(), -1) for layer in (2, 4)}
    mix = base ** 0.7 * logp[2].detach().exp() ** 0.3
    pulled = mix / mix.sum(-1, keepdim=True)

    def term(layer, teacher):
        kl = (teacher * (teacher.log() - logp[layer])).sum(-1).mean()
        return 0.5 * F.nll_loss(logp[layer], tgt) + 0.5 * kl

    exits_teacher = base if exit_teacher == "base" else logp[4].detach().exp()
    expected = 0.5 * term(2, exits_teacher) + 0.5 * term(4, pulled)
    assert_close(out.total, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, grads(expected)):
        assert_close(a, b, rtol=1e-4, atol=1e-6)
    plain = EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), lora=LoraArgs(r=2),
                            loss=ExitLossArgs(exit_layers="2", weights="uniform", distill=0.5))
    plain.load_state_dict(module.state_dict())
    assert plain.pull_exit is None and not torch.allclose(plain._loss(batch, 0, train=True)[0].total, out.total)


def test_the_shipped_exit_recipe_trains_on_a_tiny_model(tiny_dir, data_file, tmp_path):
    """configs/smollm2_ee.yaml as shipped (exit block, trunk LoRA, fused loss, the pull), its exits moved to the tiny
    model's layers: two steps with validation, and the adapter it exports reloads with the block."""
    main(["--config", str(ROOT / "configs" / "smollm2_ee.yaml"), "--model.base.name", tiny_dir, "--model.lora.r", "4",
          "--model.exit_adapters.exit_layers", "1,2", "--model.loss.exit_layers", "1,2", "--model.loss.pull_exit", "1",
          "--data.source", data_file, "--data.val_size", "4", "--data.batch_size", "4", "--data.max_length", "200",
          "--trainer.max_steps", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
          "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path)])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["hyper_parameters"]["loss"]["pull"] == 0.6
    assert any("exit_adapters." in k for k in ckpt["state_dict"]) and any("lora_" in k for k in ckpt["state_dict"])
    lm, _ = load_model(ModelArgs(name=tiny_dir, device="cpu", adapter=str(tmp_path / "adapter")))
    assert EarlyExitHead(lm).adapters is not None  # the exit block came back with the LoRA weights


@pytest.mark.parametrize("config, family", [("smollm2_quarters_ee.yaml", "llama"), ("gemma3_ee.yaml", "gemma3_text"),
                                            ("qwen2_ee.yaml", "qwen2")])
def test_each_study_recipe_trains_every_quarter_exit_of_its_family(config, family, data_file, tmp_path):
    """The three-model study's recipes as shipped (every quarter exit through the shared block, trunk LoRA, the fused
    loss, no pull) on their family's tiny model: a step and a validation, and the exported adapter reloads with the
    block at exits 1, 2 and 3 of 4 and gives the trained model's exit logits."""
    from earlyexit.tiny import save_tiny

    tiny = save_tiny(tmp_path / f"tiny-{family}", family)
    main(["--config", str(ROOT / "configs" / config), "--model.base.name", tiny, "--model.lora.r", "4",
          "--data.source", data_file, "--data.val_size", "4", "--data.batch_size", "4", "--data.max_length", "200",
          "--trainer.max_steps", "1", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
          "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run")])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1 and ckpt["hyper_parameters"]["loss"]["pull"] == 0.0
    assert any("exit_adapters.block." in k for k in ckpt["state_dict"]) and any("lora_" in k for k in ckpt["state_dict"])
    lm, _ = load_model(ModelArgs(name=tiny, device="cpu", adapter=str(tmp_path / "run" / "adapter")))
    ee = EarlyExitHead(lm)
    assert ee.adapters.kind == "block" and ee.adapters.layers == [1, 2, 3]
    ids = torch.randint(3, 100, (2, 10))
    plain = EarlyExitHead(load_model(ModelArgs(name=tiny, device="cpu"))[0])
    assert not torch.allclose(ee(ids, exit_layer=2), plain(ids, exit_layer=2))  # the exit moved


def test_pull_needs_a_trained_trunk(tiny_dir):
    with pytest.raises(EarlyExitError, match="loss.pull moves the last layer, which only trains with the trunk"):
        EarlyExitModule(base=ModelArgs(name=tiny_dir, device="cpu"), exit_adapters={"exit_layers": "2", "kind": "affine"},
                        loss=ExitLossArgs(exit_layers="2", distill=1.0, pull=0.5))


def test_compiled_blocks_train_like_eager_ones(tiny_dir, data_file, tmp_path):
    """``compile_blocks``: the blocks run compiled during fit only, and the first losses are the eager run's."""
    eager = fit(tiny_dir, data_file, tmp_path / "eager", max_steps=3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = fit(tiny_dir, data_file, tmp_path / "compiled", max_steps=3, compile_blocks=True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert sorted(compiled) == [1, 2, 3]
    for step in compiled:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-4), step
