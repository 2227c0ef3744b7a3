"""The LightningModule: wires an exit-aware causal LM into Lightning's loops. The maths live elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import torch

from earlyexit.loading import ModelArgs, load_model
from earlyexit.model import EarlyExitHead, parse_exit_layers


@dataclass
class GenerationArgs:
    """How each exit decodes.

    Args:
        max_new_tokens: Length limit of each answer, in tokens.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature (sampling only).
        top_p: Nucleus sampling mass (sampling only).
        seed: Seed of sampling; each (batch, layer) derives its own, so resumed runs sample the same.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


class EarlyExitModule(L.LightningModule):
    """A causal LM with exits; ``predict_step`` decodes every batch from every exit layer.

    Args:
        model: which model to load.
        generation: decoding options.
        exit_layers: ``quarters``, ``all``, ``everyK`` or a comma-separated list of layers 1..N.
    """

    def __init__(self, model: ModelArgs | None = None, generation: GenerationArgs | None = None, exit_layers: str = "quarters"):
        super().__init__()
        self.save_hyperparameters()
        self.lm, self.tokenizer = load_model(model or ModelArgs())
        self.ee = EarlyExitHead(self.lm)
        self.generation = generation or GenerationArgs()
        self.exit_layers = parse_exit_layers(exit_layers, self.ee.n_layers)
        self.done: dict[int, set[int]] = {}
        """Example id → layers already generated (a resumed run skips them)."""

    def predict_step(self, batch: dict, batch_idx: int = 0) -> list[dict]:
        """One row per (example, exit layer) not yet done: id, layer, text, tokens, n_tokens, finished."""
        rows = []
        gen = self.generation
        for layer in self.exit_layers:
            todo = [i for i, ex in enumerate(batch["ids"]) if layer not in self.done.get(ex, ())]
            if not todo:
                continue
            input_ids, mask = batch["input_ids"][todo], batch["attention_mask"][todo]
            first = int(mask.any(0).int().argmax())  # drop columns that are padding in every kept row
            input_ids, mask = input_ids[:, first:], mask[:, first:]
            if gen.do_sample:
                torch.manual_seed(gen.seed * 1_000_003 + batch["ids"][todo[0]] * 1_009 + layer)
            out = self.ee.generate(
                input_ids, mask, layer, max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample,
                temperature=gen.temperature, top_p=gen.top_p, pad_token_id=self.tokenizer.pad_token_id,
            )
            for row, i in enumerate(todo):
                n = int(out.n_tokens[row])
                tokens = out.tokens[row, :n].tolist()
                rows.append({
                    "id": batch["ids"][i],
                    "layer": layer,
                    "text": self.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                    "n_tokens": n,
                    "finished": bool(out.finished[row]),
                    "tokens": tokens,
                })
        return rows
