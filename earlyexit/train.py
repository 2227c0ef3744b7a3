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

import sys
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from earlyexit.data import AlpacaDataModule
from earlyexit.distributed import check_setup, configure_strategy, full_state_dict
from earlyexit.adapters import attached
from earlyexit.errors import EarlyExitError, report_errors
from earlyexit.module import EarlyExitModule


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
                print(f"adapter saved to {target}", file=sys.stderr)


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
        ckpt = self.config.get("ckpt_path")
        if ckpt and not Path(ckpt).is_file():
            raise EarlyExitError(f"checkpoint {ckpt!r} not found")


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
