"""The model's own answers to the training prompts, as an Alpaca file: the data of on-policy self-distillation.

    python scripts/self_answers.py --model.name smollm2-135m-instruct --out data/smollm2_self_answers.json
    python -m earlyexit.train --config configs/smollm2_ee.yaml   # reads data/smollm2_self_answers.json

Exits that should draft for the full model (self-speculation) must learn the full model's distribution on the text
the full model itself writes, not only on Alpaca's reference answers. This generates, once, the full model's greedy
answer to every training prompt (records after the evaluation split, which is never used) with the decoding engine,
resumably (the answers go to ``--work_dir`` batch by batch, as ``evaluate`` writes them), and writes the records
with their ``output`` replaced by that answer. Records whose answer is empty are dropped and counted. Train on the
file with ``loss.distill`` 1.0 (KL to the final layer on these answers) and ``--data.eval_size 0``, as
``configs/smollm2_ee.yaml`` does (``make smollm2-ee`` runs both).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from earlyexit.answers import TrainerArgs, generate_answers, generation_fingerprint
from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, AlpacaDataModule
from earlyexit.errors import EarlyExitError, non_negative, positive
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs, resolve_device
from earlyexit.module import EarlyExitModule
from earlyexit.results import ResultsDir


def main(model: ModelArgs = ModelArgs(), data: str = SAMPLE, skip: int = 200, limit: int | None = None,
         max_new_tokens: int = 128, batch_size: int = 32, out: str = "data/self_answers.json",
         work_dir: str = "results/self_answers", out_dir: str | None = None) -> None:
    """The model's own greedy answers to the training prompts, written as an Alpaca file.

    Args:
        model: the model whose full-depth answers are the targets (an adapter is applied if given).
        data: Alpaca records: ``alpaca-sample``, a local file or a hub id.
        skip: records at the head that are the evaluation split (never answered here, never trained on).
        limit: answer only this many training records (all when None).
        max_new_tokens: length limit of each answer.
        batch_size: prompts per batch.
        out: the Alpaca JSON file written (the records, ``output`` = the model's answer).
        work_dir: where the answers are generated (resumable, like an ``evaluate`` results directory).
        out_dir: keep the resolved config here.
    """
    non_negative("skip", skip)
    positive("limit", limit, optional=True)
    positive("max_new_tokens", max_new_tokens)
    positive("batch_size", batch_size)
    records = AlpacaDataModule(data, eval_size=10**9, offset=skip, limit=limit, batch_size=batch_size)
    examples = records.eval_records()  # every valid record after the evaluation split; bad data fails here
    generation = GenerationArgs(max_new_tokens=max_new_tokens)
    device = resolve_device(model.device)
    fingerprint = generation_fingerprint(model, records, generation, device, purpose="self_answers", skip=skip)
    module = EarlyExitModule(base=model, generation=generation, exit_layers="last")  # the answers the exits learn
    n = module.ee.n_layers
    results = ResultsDir(work_dir, fingerprint)
    if not generate_answers(module, results, records, examples, TrainerArgs(), device):
        return
    answers = {row["id"]: row["text"] for row in results.generations() if row["layer"] == n}
    written = [{**record, "output": answers[i]} for i, record in examples if answers.get(i, "").strip()]
    if not written:
        raise EarlyExitError(f"the model answered none of the {len(examples)} prompts with any text")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(written, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{len(written)} of {len(examples)} records with the model's own answers → {target} "
          f"({len(examples) - len(written)} empty answers dropped)", file=sys.stderr)


if __name__ == "__main__":
    run_function(main, "python scripts/self_answers.py")
