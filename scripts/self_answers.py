"""The model's own answers to the training prompts, as an Alpaca file: the data of on-policy self-distillation.

    python scripts/self_answers.py --model.name smollm2-135m-instruct --out data/smollm2_self_answers.json
    python -m earlyexit.train --config configs/smollm2_ee.yaml   # reads data/smollm2_self_answers.json
    python scripts/self_answers.py --samples 4 --temperature 0.7 --out data/smollm2_self_answers_x4.json   # + 3 sampled

Exits that should draft for the full model (self-speculation) must learn the full model's distribution on the text
the full model itself writes, not only on Alpaca's reference answers. This generates, once, the full model's greedy
answer to every training prompt (records after the evaluation split, which is never used) with the decoding engine,
resumably (the answers go to ``--work_dir`` batch by batch, as ``evaluate`` writes them), and writes the records
with their ``output`` replaced by that answer. Records whose answer is empty are dropped and counted. With
``--samples`` k, each prompt also gets k - 1 sampled answers, written after its greedy one. Train on the
file with ``loss.distill`` 1.0 (KL to the final layer on these answers) and ``--data.eval_size 0``, as
``configs/smollm2_ee.yaml`` does (``make smollm2-ee`` runs both).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from earlyexit.answers import TrainerArgs, fit_answer_prompts, generate_answers, generation_fingerprint
from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, AlpacaDataModule
from earlyexit.errors import EarlyExitError, non_negative, positive, require
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs, resolve_device
from earlyexit.module import EarlyExitModule
from earlyexit.results import ResultsDir


def main(model: ModelArgs = ModelArgs(), data: str = SAMPLE, skip: int = 200, limit: int | None = None,
         max_new_tokens: int = 128, batch_size: int = 32, samples: int = 1, temperature: float = 0.7,
         out: str = "data/self_answers.json", work_dir: str = "results/self_answers", out_dir: str | None = None) -> None:
    """The model's own greedy answers to the training prompts, written as an Alpaca file; with ``samples`` > 1,
    sampled answers beside them (more text written by the model itself for the exits to learn from).

    Args:
        model: the model whose full-depth answers are the targets (an adapter is applied if given).
        data: Alpaca records: ``alpaca-sample``, a local file or a hub id.
        skip: records at the head that are the evaluation split (never answered here, never trained on).
        limit: answer only this many training records (all when None).
        max_new_tokens: length limit of each answer.
        batch_size: prompts per batch.
        samples: answers per prompt: the greedy one, then ``samples - 1`` sampled at ``temperature`` (answer k with
            seed k). A prompt's answers are written one after the other, an answer equal to an earlier one of the same
            prompt is dropped, and training keeps a prompt's answers on one side of its validation split.
        temperature: sampling temperature of the sampled answers.
        out: the Alpaca JSON file written (the records, ``output`` = the model's answer).
        work_dir: where the answers are generated (resumable, like an ``evaluate`` results directory); sampled
            answer k goes to ``<work_dir>_sample<k>``.
        out_dir: keep the resolved config here.
    """
    non_negative("skip", skip)
    positive("limit", limit, optional=True)
    positive("max_new_tokens", max_new_tokens)
    positive("batch_size", batch_size)
    positive("samples", samples)
    require(temperature > 0, "temperature", temperature, "> 0")
    records = AlpacaDataModule(data, eval_size=10**9, offset=skip, limit=limit, batch_size=batch_size)
    examples = records.eval_records()  # every valid record after the evaluation split; bad data fails here
    device = resolve_device(model.device)
    answers: list[dict[int, str]] = []  # answer k of each example id
    fit_answer_prompts(model, records, examples, GenerationArgs(max_new_tokens=max_new_tokens))  # before the model loads
    module = EarlyExitModule(base=model, exit_layers="last")  # the answers the exits learn; loaded once
    for k in range(samples):
        generation = (GenerationArgs(max_new_tokens=max_new_tokens) if k == 0 else
                      GenerationArgs(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, seed=k))
        fingerprint = generation_fingerprint(model, records, generation, device, purpose="self_answers", skip=skip)
        module.generation = generation  # what predict decodes with (the engine depends on none of what changes here)
        results = ResultsDir(work_dir if k == 0 else f"{work_dir}_sample{k}", fingerprint)
        if not generate_answers(module, results, records, examples, TrainerArgs(), device):
            return
        answers.append({row["id"]: row["text"] for row in results.generations() if row["layer"] == module.ee.n_layers})
    written = []
    for i, record in examples:
        texts = [texts[i] for texts in answers if texts.get(i, "").strip()]
        written += [{**record, "output": text} for j, text in enumerate(texts) if text not in texts[:j]]
    if not written:
        raise EarlyExitError(f"the model answered none of the {len(examples)} prompts with any text")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(written, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    print(f"{len(written)} records with the model's own answers to {len(examples)} prompts ({samples} a prompt, "
          f"{len(examples) * samples - len(written)} empty or repeated answers dropped) → {target}", file=sys.stderr)


if __name__ == "__main__":
    run_function(main, "python scripts/self_answers.py")
