"""What each exit is worth as a drafter: teacher-forced top-1 agreement with the final layer, and self-speculative
acceptance, on the evaluation split.

    python scripts/acceptance.py --model.adapter checkpoints/smollm2_ee/adapter --draft_layers '[8, 15, 22]' --n_draft '[4]'

For the first ``--records`` records (the evaluation split, never trained on): the full model's greedy answers
(``--generation.max_new_tokens``, stopping at EOS) are generated once; then

* per exit, **top-1 agreement**: on those answers, teacher-forced, the share of answer positions where the exit's most
  likely next token is the final layer's (what a greedy draft from that exit keeps per drafted token);
  and what that agreement implies for self-speculation from that exit in a memory-bound cost model (a draft costs
  E/N of a step, verification one step: :func:`earlyexit.loss.speculative_speedup`), at d = 4 and at the best d;
* per (E, d), **self-speculation** through the engine: the share of drafted tokens the full model accepted, tokens kept
  per cycle, and the share of rows whose text equals full-depth greedy decoding (it must be all of them).
"""

from __future__ import annotations

import torch

from earlyexit.cli import run_function
from earlyexit.data import SAMPLE, encode_prompt, read_records
from earlyexit.engine import Engine
from earlyexit.errors import EarlyExitError, positive
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs, load_model
from earlyexit.loss import best_n_draft, speculative_speedup, top1_agreement
from earlyexit.model import EarlyExitHead, ExitLayers, parse_exit_layers
from earlyexit.results import markdown_table
from earlyexit.tokens import IGNORE_INDEX, pad


def main(model: ModelArgs = ModelArgs(), generation: GenerationArgs = GenerationArgs(max_new_tokens=64), data: str = SAMPLE,
         records: int = 200, batch: int = 8, exit_layers: ExitLayers = "8,12,15,18,22,26",
         draft_layers: list[int] = [8, 15, 22], n_draft: list[int] = [4], out_dir: str | None = None) -> None:  # noqa: B006
    """Top-1 agreement per exit and self-speculative acceptance per (E, d) on the evaluation split.

    Args:
        model: the model and its adapter (LoRA and/or exit adapters; LoRA is merged).
        generation: greedy decoding options (max_new_tokens).
        data: Alpaca records; the first ``records`` are used (the evaluation split).
        records: how many records.
        batch: prompts decoded together.
        exit_layers: exits whose top-1 agreement is reported.
        draft_layers: draft exits E of self-speculation.
        n_draft: drafted tokens per cycle d.
        out_dir: keep the resolved config here.
    """
    positive("records", records)
    positive("batch", batch)
    if not draft_layers or not n_draft or min(n_draft) < 1:
        raise EarlyExitError("draft_layers and n_draft need at least one value each, n_draft ≥ 1")
    rows = read_records(data)[:records]
    lm, tokenizer = load_model(model)
    if hasattr(lm, "merge_and_unload"):
        lm = lm.merge_and_unload()
    ee = EarlyExitHead(lm)
    n = ee.n_layers
    exits = [layer for layer in parse_exit_layers(exit_layers, n) if layer < n]
    for layer in draft_layers:
        if not 1 <= layer < n:
            raise EarlyExitError(f"draft layer {layer}: choose from 1..{n - 1}")
    engine = Engine(ee, compile=generation.compile, fast=generation.fast)
    pad_id = tokenizer.pad_token_id
    prompts = [encode_prompt(r, tokenizer) for r in rows]
    agree = {layer: [0.0, 0] for layer in exits}
    spec = {(e, d): [0, 0, 0, 0] for e in draft_layers for d in n_draft}  # drafted, accepted, rows equal, rows
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        ids = pad(chunk, pad_id, "left").to(lm.device)
        mask = pad([[1] * len(p) for p in chunk], 0, "left").to(lm.device)
        full = engine.generate(ids, mask, [n], generation, pad_token_id=pad_id)[n]
        answers = [full.tokens[i, : int(full.n_tokens[i])].tolist() for i in range(len(chunk))]
        # teacher-forced: prompt + the full model's own answer, right-padded, labels on the answer
        seqs = [p + a for p, a in zip(chunk, answers)]
        tf_ids = pad(seqs, pad_id, "right").to(lm.device)
        tf_mask = pad([[1] * len(s) for s in seqs], 0, "right").to(lm.device)
        labels = pad([[IGNORE_INDEX] * len(p) + a for p, a in zip(chunk, answers)], IGNORE_INDEX, "right").to(lm.device)
        with torch.no_grad():
            hidden = ee.hidden_states(tf_ids, tf_mask, exit_layers=exits + [n])
        positions = int((labels[:, 1:] != IGNORE_INDEX).sum())
        for layer, share in top1_agreement(hidden, labels, ee.exit_logits, n).items():
            agree[layer][0] += float(share) * positions
            agree[layer][1] += positions
        for (e, d), acc in spec.items():
            out = engine.generate_speculative(ids, mask, e, d, generation, pad_token_id=pad_id)
            acc[0] += out.drafted
            acc[1] += out.accepted
            acc[2] += sum(out.tokens[i, : int(out.n_tokens[i])].tolist() == answers[i] for i in range(len(chunk)))
            acc[3] += len(chunk)
    device = torch.cuda.get_device_name() if lm.device.type == "cuda" else "CPU"
    print(f"{model.name} (adapter {model.adapter}) on {device}: first {len(rows)} records of {data}, greedy, "
          f"{generation.max_new_tokens} new tokens at most, batch {batch}")
    rows = []
    for layer, (a, m) in agree.items():
        share = a / max(m, 1)
        d, speedup = best_n_draft(share, layer, n)
        rows.append([layer, f"{share:.3f}", f"{speculative_speedup(share, layer, n, 4):.2f}×", f"d = {d}: {speedup:.2f}×"])
    print(markdown_table(["exit", "teacher-forced top-1 agreement with the final layer", "expected speed-up at d = 4",
                          "best d (expected)"], rows))
    print("(expected: a draft token costs E/N of a full-depth step, a verification one step; overheads ignored)")
    print()
    # a row's cycle drafts d tokens and keeps the accepted ones plus the full model's own: 1 + d · acceptance
    print(markdown_table(["E", "d", "acceptance", "tokens per cycle", "rows equal to full depth"],
                         [[e, d, f"{acc[1] / max(acc[0], 1):.3f}", f"{1 + d * acc[1] / max(acc[0], 1):.2f}",
                           f"{acc[2]}/{acc[3]}"] for (e, d), acc in spec.items()]))


if __name__ == "__main__":
    run_function(main, "python scripts/acceptance.py")
