"""Early-exit LoRA fine-tuning on the Lightning Trainer (LayerSkip's loss, curricula and layer dropout).

    python -m earlyexit.train --config configs/smollm2_lora.yaml
    python -m earlyexit.train --config configs/llama2_lora.yaml --trainer.devices 4 --trainer.strategy fsdp
    python -m earlyexit.train --config configs/debug.yaml --ckpt_path checkpoints/debug/checkpoints/last.ckpt   # resume

The YAML's ``model:``, ``data:`` and ``trainer:`` keys are the ``__init__`` arguments of
:class:`~earlyexit.module.EarlyExitModule`, :class:`~earlyexit.data.AlpacaDataModule` and
``lightning.Trainer``. The resolved config is saved beside the checkpoints, and the peft adapter is
exported to ``<default_root_dir>/adapter`` at the end, ready for ``evaluate --model.adapter``. Checkpoints
(adapter weights, optimiser, schedule, loop state) go to ``<default_root_dir>/checkpoints``: every 100 steps
and ``last.ckpt``.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from earlyexit.adapters import attached
from earlyexit.data import AlpacaDataModule, padded_batch
from earlyexit.distributed import check_setup, configure_strategy, full_state_dict
from earlyexit.errors import EarlyExitError, report_errors
from earlyexit.loss import early_exit_loss
from earlyexit.module import PULL_REFUSAL, EarlyExitModule
from earlyexit.provenance import record_base
from earlyexit.tokens import IGNORE_INDEX


class AdapterExport(Callback):
    """Saves what trained when training ends, once (rank 0): the peft LoRA adapter and the exit adapters
    (``exit_adapters.*``) to ``<default_root_dir>/adapter``, and after full fine-tuning the whole model (with its
    tokenizer) to ``<default_root_dir>/model``, loadable as ``--model.name``.

    Under FSDP the weights are gathered first (every rank takes part), so the files hold full weights.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        peft = hasattr(pl_module.lm, "peft_config")
        adapters = attached(pl_module.lm)
        full = pl_module.full_finetune
        if not peft and adapters is None and not full:
            return
        state = full_state_dict(trainer, pl_module)
        if trainer.is_global_zero:
            lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.") and "exit_adapters." not in k}
            if full:
                target = Path(trainer.default_root_dir) / "model"
                pl_module.lm.save_pretrained(target, state_dict=lm_state)
                pl_module.tokenizer.save_pretrained(target)
                print(f"model saved to {target}", file=sys.stderr)
            target = Path(trainer.default_root_dir) / "adapter"
            if peft:
                pl_module.lm.save_pretrained(target, state_dict=lm_state)
            if adapters is not None:
                adapters.save(target, {k.split("exit_adapters.", 1)[1]: v for k, v in state.items() if "exit_adapters." in k})
            if peft or adapters is not None:
                base = pl_module.lm.get_base_model() if hasattr(pl_module.lm, "get_base_model") else pl_module.lm
                record_base(target, base.config, pl_module.hparams.base["name"])  # what it fits (earlyexit.provenance)
                print(f"adapter saved to {target}", file=sys.stderr)


class TimeToLoss(Callback):
    """A training clock with its own validation: every ``every`` steps (and at the last) it measures the
    cross-entropy of every trained exit on the validation split, the same way whatever the run's batching (padded
    batches of 16, summed over answer tokens, no teacher), and records it with the seconds of training so far; the
    measuring is not counted. With ``targets_from`` (another run's ``out`` file), training stops at the first check
    where every exit is at or below that run's last measured cross-entropy. Writes ``out`` (JSON) at the end.

    Args:
        out: where the records go (JSON: ``{"records": [{"step", "seconds", "ce": {layer: nats}}], "reached": step}``).
        every: steps between two measurements.
        targets_from: a run's ``out`` file whose last record is the target, or None.
    """

    def __init__(self, out: str, every: int = 50, targets_from: str | None = None):
        if every < 1:
            raise EarlyExitError(f"TimeToLoss every = {every} is out of range: it must be an integer ≥ 1")
        self.out, self.every = Path(out), every
        self.targets = None
        if targets_from is not None:
            if not Path(targets_from).is_file():
                raise EarlyExitError(f"TimeToLoss targets_from {targets_from!r} not found")
            self.targets = {int(k): v for k, v in json.loads(Path(targets_from).read_text())["records"][-1]["ce"].items()}
        self.records: list[dict] = []
        self.reached: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        dm = trainer.datamodule
        pad_id = dm.tokenizer.pad_token_id
        examples = dm.val_set
        keys = ("input_ids", "attention_mask", "labels")
        self.batches = [{k: v for k, v in padded_batch(examples[i : i + 16], pad_id).items() if k in keys}
                        for i in range(0, len(examples), 16)]
        if not self.batches:
            raise EarlyExitError("TimeToLoss needs a validation split: set data.val_size > 0")
        missing = sorted(set(self.targets or ()) - set(pl_module.train_exits))
        if missing:
            raise EarlyExitError(f"TimeToLoss: the target run trained exits {missing} that this run does not train")
        self.seconds = 0.0
        self.started = self._now(pl_module)

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    @torch.no_grad()
    def measure(self, pl_module) -> dict[int, float]:
        """Cross-entropy (nats per answer token) of every trained exit over the validation split."""
        modes = [(module, module.training) for module in pl_module.modules()]
        pl_module.eval()
        ee, exits = pl_module.ee, pl_module.train_exits
        sums, tokens = dict.fromkeys(exits, 0.0), 0
        for batch in self.batches:
            batch = {k: v.to(pl_module.device) for k, v in batch.items()}
            count = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            with torch.autocast(pl_module.device.type, dtype=torch.bfloat16, enabled=pl_module.device.type == "cuda"):
                hidden = ee.hidden_states(batch["input_ids"], batch["attention_mask"], exit_layers=exits)
                out = early_exit_loss(hidden, batch["labels"], ee.exit_logits, dict.fromkeys(exits, 1.0))
            for layer in exits:
                sums[layer] += float(out.per_exit[layer]) * count
            tokens += count
        for module, training in modes:
            module.training = training
        return {layer: total / max(tokens, 1) for layer, total in sums.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (step % self.every and step < trainer.max_steps) or (self.records and self.records[-1]["step"] == step):
            return  # not a measuring step, or one already measured (gradient accumulation: several batches a step)
        self.seconds += self._now(pl_module) - self.started
        ce = self.measure(pl_module)
        self.records.append({"step": step, "seconds": self.seconds, "ce": ce})
        if trainer.is_global_zero:
            print(f"step {step}: {self.seconds:.1f} s of training, CE " + " ".join(f"{l}:{v:.3f}" for l, v in ce.items()),
                  file=sys.stderr)
        if self.targets is not None and self.reached is None and all(ce[l] <= t for l, t in self.targets.items() if l in ce):
            self.reached = step
            trainer.should_stop = True
        self.started = self._now(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.out.write_text(json.dumps({"records": self.records, "reached": self.reached}, indent=1) + "\n")


class EarlyExitCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="checkpoint to resume from (exact resume)")

    def before_instantiate_classes(self) -> None:
        """Refusals that need no model: the machine's devices, the output directory, the checkpoint to resume."""
        trainer = self.config.trainer
        check_setup(trainer.accelerator, trainer.devices, trainer.strategy, trainer.num_nodes)
        root = Path(trainer.default_root_dir or ".")
        if root.exists() and not root.is_dir():
            raise EarlyExitError(f"trainer.default_root_dir {str(root)!r} is a file, not a directory")
        try:  # checkpoints and the adapter go there: refused now, not after the model loads or training ends
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-test.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise EarlyExitError(f"trainer.default_root_dir {str(root)!r} is not writable: {err.strerror}") from None
        if self.config.model.loss.pull > 0 and self.config.data.teacher_cache:
            raise EarlyExitError(PULL_REFUSAL)
        ckpt = self.config.get("ckpt_path")
        if ckpt and not Path(ckpt).is_file():
            raise EarlyExitError(f"checkpoint {ckpt!r} not found")
        if ckpt:
            from earlyexit.provenance import check_weights

            check_weights(ckpt, "checkpoint", "resume from an earlier one (the checkpoints directory keeps them)")


@report_errors
def main(args: list[str] | None = None) -> None:
    # Our sampler resumes mid-epoch from the loop's own saved progress (EpochSampler.start, set in
    # train_dataloader), so Lightning's "dataloader is not resumable … unreliable results" does not apply.
    warnings.filterwarnings("ignore", message=r".*dataloader is not resumable.*")
    cli = EarlyExitCLI(
        EarlyExitModule,
        AlpacaDataModule,
        run=False,
        args=args,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"callbacks": [AdapterExport(), ModelCheckpoint(save_last=True, every_n_train_steps=100)]},
        parser_kwargs={"prog": "python -m earlyexit.train", "description": __doc__.split("\n\n")[0]},
    )
    cli.datamodule.attach_tokenizer(cli.model.tokenizer)
    for callback in cli.trainer.checkpoint_callbacks:  # one predictable place: <default_root_dir>/checkpoints/last.ckpt
        if callback.dirpath is None:
            callback.dirpath = str(Path(cli.trainer.default_root_dir) / "checkpoints")
    ckpt = cli.config.get("ckpt_path")
    configure_strategy(cli.trainer.strategy, cli.model)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)


if __name__ == "__main__":
    main()
