"""Answers per exit layer, generated once into a results directory: the loop that ``evaluate`` and ``judge`` share.

:func:`generate_answers` runs Lightning's predict loop over the examples a results directory does not hold yet,
on one device or sharded over several (each example generated exactly once), appending each batch's answers as
soon as it ends, so a killed run loses at most the batch in flight. :func:`generation_fingerprint` is what those
answers depend on, by value and by content: a directory never mixes answers of two different inputs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import BasePredictionWriter

from earlyexit.data import AlpacaDataModule
from earlyexit.distributed import check_setup
from earlyexit.errors import EarlyExitError, positive
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs, resolve_dtype
from earlyexit.module import EarlyExitModule
from earlyexit.results import ResultsDir


@dataclass
class TrainerArgs:
    """Where the predict loop runs (Lightning Trainer options).

    Args:
        accelerator: ``cpu``, ``gpu`` or ``auto`` (follows --model.device).
        devices: Devices (processes) per node; with more than one the examples are sharded over them.
        num_nodes: Nodes (under torchrun or SLURM).
        strategy: Lightning strategy of a sharded run (``ddp``: each rank holds a full copy of the model).
    """

    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"

    def __post_init__(self):
        positive("trainer.devices", self.devices)
        positive("trainer.num_nodes", self.num_nodes)


class GenerationWriter(BasePredictionWriter):
    """Appends each batch's generations to the results directory as soon as the batch ends."""

    def __init__(self, results: ResultsDir):
        super().__init__(write_interval="batch")
        self.results = results

    def on_predict_start(self, trainer, pl_module) -> None:
        self.started = time.perf_counter()  # every rank has joined: the generation itself starts here

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.results.append(prediction, rank=trainer.global_rank if trainer.world_size > 1 else None)


def check_evaluation_setup(trainer_args: TrainerArgs) -> None:
    """Devices and strategy of the predict loop: data parallel only (each rank generates with a whole model)."""
    check_setup(trainer_args.accelerator, trainer_args.devices, trainer_args.strategy, trainer_args.num_nodes)
    if trainer_args.strategy not in ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"):
        raise EarlyExitError(f"trainer.strategy {trainer_args.strategy!r}: evaluation shards the examples over ranks that "
                             "each hold the whole model; use ddp")


def generation_fingerprint(model_args: ModelArgs, data: AlpacaDataModule, generation: GenerationArgs, device,
                           **extra) -> dict:
    """What the generations of a results directory depend on (a directory never mixes two of them): the options,
    and the content of the model, the adapter and the evaluation records (an input changed in place is caught)."""
    from earlyexit.identity import model_identity, records_sha256, tree_sha256

    hp = data.hparams
    loaded = data.load()
    return {
        "model": model_args.name,
        "model_content": model_identity(model_args.name),
        "adapter": model_args.adapter,
        "adapter_content": tree_sha256(model_args.adapter) if model_args.adapter else None,
        "data_content": records_sha256(list(zip(loaded.ids, loaded.records))[: hp.eval_size]),
        "dtype": str(resolve_dtype(model_args.dtype, device)),
        "data": hp.source,
        "template": hp.template,
        "max_length": hp.max_length,
        "generation": asdict(generation),
        **extra,
    }


def fit_answer_prompts(model_args: ModelArgs, data: AlpacaDataModule, examples: list[tuple[int, dict]],
                       generation: GenerationArgs) -> None:
    """Before any model weights load: the model's files (:func:`~earlyexit.loading.preflight`), a dynamic exit through
    a shared exit block where the engine's fast path does not run (refused), then the prompts of ``examples`` against
    its window with ``generation.max_new_tokens`` (:mod:`earlyexit.context`), refused in one line or, with
    ``generation.context truncate``, cut from the left (``data`` then keeps the last tokens of each prompt that fit)."""
    from earlyexit.adapters import shared_block
    from earlyexit.arch import off_fast_path
    from earlyexit.context import fit_prompts, window_of
    from earlyexit.loading import load_tokenizer, preflight

    path, config = preflight(model_args)  # the model's and its adapter's files, and what the adapter was trained on
    why = off_fast_path(config, generation.fast)
    if generation.exit == "dynamic" and generation.engine and why and model_args.adapter and shared_block(model_args.adapter):
        raise EarlyExitError(f"generation.exit dynamic: the shared exit block of {model_args.adapter} is read by dynamic "
                             f"exits on the engine's fast path only, which {why} do not take: use fixed exits")
    window = window_of(config)
    if window is None:
        return
    data.attach_tokenizer(load_tokenizer(path))
    fit_prompts([data.prompt_ids(r) for _, r in examples], window, generation.max_new_tokens, generation.context,
                "evaluation prompt")
    data.prompt_limit = window - generation.max_new_tokens


def generate_answers(module: EarlyExitModule, results: ResultsDir, data: AlpacaDataModule,
                     examples: list[tuple[int, dict]], trainer_args: TrainerArgs, device) -> bool:
    """Generate every (example, exit layer) answer that ``results`` does not hold yet, through the predict loop.

    ``examples`` are ``(id, record)`` pairs of Alpaca-shaped records; the prompt is rendered by ``data``.
    With several devices (``trainer_args``) the predict loop shards the examples over the ranks without
    padding (each is generated exactly once); each rank appends to its own file, and once all are done the
    first folds them into ``generations.jsonl``. Returns whether this process is the first (rank 0) one.
    """
    module.resume_from(results.generations())
    todo = [(i, r) for i, r in examples if not set(module.exit_layers) <= module.done.get(i, set())]
    data.attach_tokenizer(module.tokenizer)
    data.set_predict(todo)
    if not todo:
        print(f"{len(examples)} examples × {len(module.exit_layers)} exit layers: all done in {results.path}", file=sys.stderr)
        return rank_zero_only.rank == 0  # under torchrun/SLURM every rank gets here; only the first scores
    accelerator = "gpu" if device.type == "cuda" and trainer_args.accelerator == "auto" else trainer_args.accelerator
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=trainer_args.devices, num_nodes=trainer_args.num_nodes, strategy=trainer_args.strategy,
        logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[GenerationWriter(results)],
    )
    if trainer.is_global_zero:
        print(f"{len(examples)} examples × {len(module.exit_layers)} exit layers {module.exit_layers}; "
              f"{len(examples) - len(todo)} examples already done in {results.path}; {trainer.world_size} process(es)",
              file=sys.stderr)
    writer = next(c for c in trainer.callbacks if isinstance(c, GenerationWriter))
    trainer.predict(module, dataloaders=data.predict_dataloader(), return_predictions=False)
    if trainer.world_size > 1:
        trainer.strategy.barrier()  # every rank's file is complete
    seconds = time.perf_counter() - writer.started
    if trainer.world_size > 1 and trainer.is_global_zero:
        results.merge_ranks()
    if trainer.is_global_zero:
        print(f"generated {len(todo)} examples × {len(module.exit_layers)} exit layers in {seconds:.1f} s "
              f"on {trainer.world_size} process(es)", file=sys.stderr)
    return trainer.is_global_zero


def add_answer_options(parser, data_class: type) -> None:
    """The options every command that generates answers per exit takes: ``--model.*``, ``--data.*`` (``data_class``),
    ``--generation.*``, ``--trainer.*`` and ``--exit_layers``."""
    from earlyexit.model import ExitLayers

    parser.add_class_arguments(ModelArgs, "model")
    parser.add_class_arguments(data_class, "data")
    parser.add_class_arguments(GenerationArgs, "generation")
    parser.add_class_arguments(TrainerArgs, "trainer")
    parser.add_argument("--exit_layers", type=ExitLayers, default="quarters",
                        help="quarters (N/4, N/2, 3N/4, N), all, everyK (every K-th from the top), or a list like 8,16,24,32")
