"""Build a teacher cache: the base model's top-k next-token log-probabilities on every training example, once.

    python scripts/teacher_cache.py --model.name smollm2-135m-instruct --top_k 64 --out data/smollm2_teacher.safetensors
    python -m earlyexit.train --config configs/smollm2_lora.yaml --data.teacher_cache data/smollm2_teacher.safetensors

Distillation with a training trunk (LoRA, full fine-tuning) otherwise runs the base model once more every step.
The examples are those ``AlpacaDataModule`` trains and validates on with the same data options (``--source``,
``--max_length`` … : the training config's ``data.*``), keyed by content, so any order or split of them reads the cache and other data is refused.
"""

from __future__ import annotations

import sys

from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, AlpacaDataModule, Template
from earlyexit.errors import positive
from earlyexit.loading import ModelArgs, load_model
from earlyexit.model import EarlyExitHead


def main(model: ModelArgs = ModelArgs(), source: str = SAMPLE, template: Template = "auto", eval_size: int = 200,
         val_size: int = 100, max_length: int = 512, seed: int = 0, top_k: int = 64, batch_size: int = 16,
         out: str = "data/teacher.safetensors", out_dir: str | None = None) -> None:
    """The base model's top-k log-probabilities at every answer position of the training and validation examples.

    Args:
        model: the teacher (the model as training loads it, without its LoRA adapter).
        source, template, eval_size, val_size, max_length, seed: the training run's ``data.*`` options.
        top_k: tokens kept per position (the vocabulary size keeps the exact teacher).
        batch_size: examples per forward pass.
        out: the cache file (safetensors).
        out_dir: keep the resolved config here.
    """
    from earlyexit import teacher

    positive("top_k", top_k)
    positive("batch_size", batch_size)
    data = AlpacaDataModule(source, template=template, eval_size=eval_size, val_size=val_size, max_length=max_length,
                            seed=seed)
    data.load()  # bad data fails here, before the model loads
    lm, tokenizer = load_model(model)
    data.attach_tokenizer(tokenizer)
    data.setup("fit")
    examples = data.val_set + data.train_set
    ids, logp, keys = teacher.build(EarlyExitHead(lm), examples, top_k, batch_size, tokenizer.pad_token_id)
    about = {"model": model.name, "adapter": model.adapter, "top_k": top_k, "data": dict(data.hparams)}
    teacher.save(out, ids, logp, keys, examples, about)
    print(f"teacher cache: {len(examples)} examples, {ids.shape[0]} answer positions, top {ids.shape[1]} → {out}",
          file=sys.stderr)


if __name__ == "__main__":
    run_function(main, "python scripts/teacher_cache.py")
