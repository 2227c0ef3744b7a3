"""Stanford Alpaca as a LightningDataModule: loading, validation, prompt rendering, tokenisation, batching.

Records are ``{"instruction", "input", "output"}`` (Taori et al., 2023). Prompts use the original Alpaca
template or the tokenizer's chat template. Training examples are prompt + answer + EOS with the prompt
masked out of the labels; generation batches are prompts only, left-padded.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from earlyexit.errors import EarlyExitError, non_negative, positive
from earlyexit.network import hub_offline, offline_miss, require_hub
from earlyexit.tokens import IGNORE_INDEX, pad, supervised_tokens

log = logging.getLogger(__name__)

HUB_ID = "tatsu-lab/alpaca"
SAMPLE = "alpaca-sample"
"""The 5,000-record Alpaca sample shipped inside the package (``earlyexit/assets``, CC BY-NC 4.0)."""
FIELDS = ("instruction", "input", "output")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

Template = Literal["auto", "alpaca", "chat"]


@dataclass
class Records:
    """Valid records with their index in the source, and what was dropped."""

    records: list[dict] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    bad: dict[int, str] = field(default_factory=dict)


def sample_path() -> Path:
    """The shipped Alpaca sample (package data, so ``pip install`` carries it)."""
    return Path(__file__).resolve().parent / "assets" / "alpaca_sample.json"


def read_records(source: str) -> list:
    """Read ``alpaca-sample`` (the shipped sample), a local ``.json`` (list) / ``.jsonl`` file, or the hub dataset ``source``."""
    path = sample_path() if source == SAMPLE else Path(source).expanduser()
    if path.is_dir():
        raise EarlyExitError(f"data source {source!r} is a directory; expected an alpaca_data.json file")
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".jsonl":
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise EarlyExitError(f"{source}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        if not isinstance(data, list):
            raise EarlyExitError(f"{source}: expected a JSON list of records, found {type(data).__name__}")
        return data
    if path.suffix in (".json", ".jsonl") or source.startswith(("/", ".", "~")):
        raise EarlyExitError(f"data file {source!r} not found")
    instead = f"--data.source {SAMPLE} (the shipped sample) or a local alpaca_data.json"
    require_hub(f"dataset {source!r}", instead)  # no network: one line in seconds, not a retry storm
    try:
        import datasets

        return list(datasets.load_dataset(source, split="train"))
    except Exception as err:  # the hub raises many types: offline, missing, gated …
        if hub_offline():
            raise offline_miss(f"dataset {source!r}", instead) from None
        raise EarlyExitError(f"could not load {source!r} from the Hugging Face hub ({type(err).__name__}); pass {instead}") from None


def validate(raw: list, strict: bool = False, fields: tuple[str, str, str] = FIELDS) -> Records:
    """Keep records with string fields and a non-empty instruction and output; count the rest.

    ``fields`` names the source's fields that play instruction, input and output (``judge`` reads question,
    context and answer fields of other data sets); kept records always come back under Alpaca's names.
    """
    out = Records()
    for index, record in enumerate(raw):
        problem = _problem(record, fields)
        if problem is None:
            out.records.append({alpaca: record[name] for alpaca, name in zip(FIELDS, fields)})
            out.ids.append(index)
        elif strict:
            raise EarlyExitError(f"record {index}: {problem}")
        else:
            out.bad[index] = problem
    if out.bad:
        first = next(iter(out.bad.items()))
        log.warning("skipped %d bad record(s) of %d; first: record %d: %s", len(out.bad), len(raw), *first)
    return out


def _problem(record, fields: tuple[str, str, str] = FIELDS) -> str | None:
    if not isinstance(record, dict):
        return f"expected an object, found {type(record).__name__}"
    for name in fields:
        if name not in record:
            return f"missing field {name!r}"
        if not isinstance(record[name], str):
            return f"field {name!r} is {type(record[name]).__name__}, not a string"
    for name in (fields[0], fields[2]):
        if not record[name].strip():
            return f"empty {name!r}"
    return None


def render_prompt(record: dict, tokenizer, template: Template = "auto") -> str:
    """The prompt text for one record (the answer is not part of it)."""
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise EarlyExitError("template 'chat' was asked for, but the tokenizer has no chat template")
        content = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        return render_chat([{"role": "user", "content": content}], tokenizer)
    form = ALPACA_PROMPT if record["input"] else ALPACA_PROMPT_NO_INPUT
    return form.format(**record)


def render_chat(messages: list[dict], tokenizer) -> str:
    """Chat ``messages`` (``role``, ``content``) followed by the assistant's turn: the tokenizer's chat template,
    or, for a tokenizer without one, a plain ``role: text`` transcript ending in ``assistant:``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def encode_chat(messages: list[dict], tokenizer) -> list[int]:
    """Token ids of :func:`render_chat` (a chat template writes its own special tokens; a transcript gets the
    tokenizer's)."""
    return tokenizer(render_chat(messages, tokenizer), add_special_tokens=not getattr(tokenizer, "chat_template", None))["input_ids"]


def uses_chat(tokenizer, template: Template) -> bool:
    return template == "chat" or (template == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def encode_prompt(record: dict, tokenizer, template: Template = "auto") -> list[int]:
    # A chat template already writes the special tokens (BOS …); the plain template needs the tokenizer's.
    text = render_prompt(record, tokenizer, template)
    return tokenizer(text, add_special_tokens=not uses_chat(tokenizer, template))["input_ids"]


def encode_examples(records: list[dict], tokenizer, template: Template = "auto", max_length: int = 512) -> list[dict]:
    """Per record: prompt + answer + EOS, labels -100 on the prompt; truncated on the right to ``max_length``.

    The prompts and the answers are each tokenised in one batched call: the ids of one call a text, in a third to
    two thirds of its time (the 5,000-record sample on 2 CPU cores: SmolLM2's tokenizer 1.0 s against 2.8 s)."""
    if not records:
        return []
    special = not uses_chat(tokenizer, template)  # a chat template writes its own special tokens
    prompts = tokenizer([render_prompt(r, tokenizer, template) for r in records], add_special_tokens=special)["input_ids"]
    answers = tokenizer([r["output"] for r in records], add_special_tokens=False)["input_ids"]
    eos, examples = tokenizer.eos_token_id, []
    for prompt, answer in zip(prompts, answers):
        answer = answer + [eos]
        examples.append({"input_ids": (prompt + answer)[:max_length],
                         "labels": ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]})
    return examples


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of examples grouped into rows of at most ``capacity`` tokens (first fit, longest first); an example
    longer than ``capacity`` gets a row of its own. Rows keep their examples in the order given."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[row].append(i)
            room[row] -= lengths[i]
    return [sorted(row) for row in rows]


def padded_batch(examples: list[dict], pad_id: int) -> dict:
    """One example per row, right-padded to the longest: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (and
    the examples' cached teacher, if any)."""
    input_ids = pad([e["input_ids"] for e in examples], pad_id, "right")
    attention_mask = pad([[1] * len(e["input_ids"]) for e in examples], 0, "right")
    labels = pad([e["labels"] for e in examples], IGNORE_INDEX, "right")
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **cached_teacher(examples)}


def packed_batch(examples: list[dict], capacity: int, pad_id: int) -> dict:
    """Several examples per row (sequence packing): ``input_ids``, ``labels`` and ``position_ids`` ``[R, T]``, positions
    restarting at 0 on each example, and no ``attention_mask``: the model's own masks, given restarting positions and
    no mask, keep each token's attention within its example. A row's tail is padding (label ``IGNORE_INDEX``,
    positions running on). At an example's boundary the next token is the following example's first prompt token,
    whose label is ``IGNORE_INDEX``, so no loss crosses examples: the loss is the unpacked batch's, token for token.
    """
    rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
    ids, labels, position_ids = [], [], []
    for row in rows:
        ids.append([t for i in row for t in examples[i]["input_ids"]])
        labels.append([t for i in row for t in examples[i]["labels"]])
        position_ids.append([p for i in row for p in range(len(examples[i]["input_ids"]))])
    width = max(len(r) for r in ids)
    position_ids = [p + list(range(p[-1] + 1, p[-1] + 1 + width - len(p))) for p in position_ids]
    batch = {"input_ids": pad(ids, pad_id, "right"), "labels": pad(labels, IGNORE_INDEX, "right"),
             "position_ids": torch.tensor(position_ids, dtype=torch.long), "attention_mask": None}
    return {**batch, **cached_teacher([examples[i] for row in rows for i in row])}


def cached_teacher(examples: list[dict]) -> dict:
    """The examples' cached teacher (``data.teacher_cache``) as ``teacher_ids`` / ``teacher_logp`` ``[M, k]``, in the
    order the loss reads answer positions (row by row, example by example), or nothing without a cache."""
    if not examples or "teacher" not in examples[0]:
        return {}
    return {"teacher_ids": torch.cat([e["teacher"][0] for e in examples]),
            "teacher_logp": torch.cat([e["teacher"][1] for e in examples])}


class EpochSampler(DistributedSampler):
    """A seeded permutation per epoch that can start part-way through one, for exact resume, and shards it
    across ``world`` ranks so that training on W ranks sees the same global batches as one process.

    Global batch ``s`` is ``order[s·B·W : (s+1)·B·W]`` (B examples per rank); rank r takes its r-th block of B.
    With W > 1 a trailing partial global batch is dropped, so every rank runs the same number of steps.
    Being a ``DistributedSampler``, Lightning uses it as is instead of wrapping it in one of its own.
    Lightning calls :meth:`set_epoch`; ``start`` (examples this rank already consumed this epoch) is read once.
    """

    def __init__(self, n: int, seed: int = 0, batch_size: int = 1, rank: int = 0, world: int = 1):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=False)
        self.n, self.seed, self.batch_size, self.world = n, seed, batch_size, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _mine(self) -> list[int]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch)).tolist()
        if self.world == 1:
            return order
        width = self.batch_size * self.world
        return [order[s * width + self.rank * self.batch_size + j] for s in range(self.n // width) for j in range(self.batch_size)]

    def __iter__(self):
        start, self.start = self.start, 0
        return iter(self._mine()[start:])

    def __len__(self) -> int:
        return self.n if self.world == 1 else self.n // (self.batch_size * self.world) * self.batch_size


def prompt_groups(records: list[dict]) -> list[list[dict]]:
    """Records grouped by prompt (instruction and input), in order of first appearance; each group in source order."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["instruction"], record.get("input") or ""), []).append(record)
    return list(groups.values())


def held_out_groups(groups: list[list], size: int) -> int:
    """How many leading groups hold at least ``size`` items (all of them when they hold fewer)."""
    count = 0
    for n, group in enumerate(groups):
        if count >= size:
            return n
        count += len(group)
    return len(groups)


class AlpacaDataModule(L.LightningDataModule):
    """Alpaca records for early-exit training (``fit``) and per-layer generation (``predict``).

    The first ``eval_size`` valid records (in source order) form the evaluation split, never trained on;
    the remaining records are shuffled with ``seed`` and ``val_size`` of them are kept for validation. Records that
    share a prompt (several answers to one instruction and input, as ``scripts/self_answers.py --samples`` writes)
    move together: all on the validation side or all on the training side.

    Args:
        source: ``alpaca-sample`` (5,000 Alpaca records shipped with the package), a local ``alpaca_data.json`` /
            ``.jsonl`` path, or a hub dataset id such as ``tatsu-lab/alpaca``.
        template: prompt format: ``alpaca`` (the original template), ``chat`` (the tokenizer's chat template),
            or ``auto`` (chat when the tokenizer has a template).
        eval_size: records at the head of the source held out for evaluation.
        offset: first record of the evaluation split used by ``predict``.
        limit: number of evaluation records used by ``predict`` (all of the split when None).
        val_size: training records held out for validation loss (more when the last prompt held out has several
            answers: they all go to validation).
        max_length: tokens per training example (prompt + answer), and per prompt for generation.
        batch_size: examples per batch.
        pack: training and validation batches put several examples in one row of up to ``max_length`` tokens
            (sequence packing, attention kept within each example) instead of padding every row to the longest;
            the same examples per step and the same loss, on fewer tokens.
        teacher_cache: a teacher cache (``scripts/teacher_cache.py``: the base model's top-k log-probabilities on
            these examples) read with each batch, so distillation runs no teacher forward pass.
        num_workers: DataLoader workers.
        seed: seed of the train/validation split and of training order.
        strict: fail on the first bad record instead of skipping and counting it.
    """

    def __init__(
        self,
        source: str = SAMPLE,
        template: Template = "auto",
        eval_size: int = 200,
        offset: int = 0,
        limit: int | None = None,
        val_size: int = 100,
        max_length: int = 512,
        batch_size: int = 8,
        pack: bool = False,
        teacher_cache: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
        strict: bool = False,
    ):
        super().__init__()
        non_negative("data.eval_size", eval_size)
        non_negative("data.offset", offset)
        positive("data.limit", limit, optional=True)
        non_negative("data.val_size", val_size)
        positive("data.max_length", max_length)
        positive("data.batch_size", batch_size)
        non_negative("data.num_workers", num_workers)
        if teacher_cache is not None and not Path(teacher_cache).is_file():
            raise EarlyExitError(f"teacher cache {teacher_cache!r} not found (build it with scripts/teacher_cache.py)")
        self.save_hyperparameters()
        self.tokenizer = None
        self.train_set: list[dict] = []
        self.val_set: list[dict] = []
        self.predict_set: list[dict] = []
        self.no_answer = 0
        """Training/validation examples skipped because no answer token fits in ``max_length``."""
        self._loaded: Records | None = None

    def attach_tokenizer(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def load(self) -> Records:
        """The validated records of the source (read once)."""
        if self._loaded is None:
            self._loaded = validate(read_records(self.hparams.source), strict=self.hparams.strict)
        return self._loaded

    def eval_records(self) -> list[tuple[int, dict]]:
        """``(id, record)`` pairs of the evaluation slice; ids are indices in the source."""
        hp = self.hparams
        loaded = self.load()
        pairs = list(zip(loaded.ids, loaded.records))[: hp.eval_size]
        end = None if hp.limit is None else hp.offset + hp.limit
        chosen = pairs[hp.offset : end]
        if not chosen:
            raise EarlyExitError(
                f"empty evaluation slice: offset={hp.offset}, limit={hp.limit} of {len(pairs)} evaluation records "
                f"({len(loaded.records)} valid records in {hp.source!r})"
            )
        return chosen

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            raise RuntimeError("AlpacaDataModule needs attach_tokenizer() before setup()")
        hp = self.hparams
        if stage == "predict":
            self.set_predict(self.eval_records())
            return
        loaded = self.load()
        rest = loaded.records[hp.eval_size :]
        groups = prompt_groups(rest)
        random.Random(hp.seed).shuffle(groups)  # with one record a prompt: the same order as shuffling the records
        if len(rest) <= hp.val_size:
            raise EarlyExitError(f"{len(rest)} training records left after holding out {hp.eval_size} for evaluation")
        # Position 0 predicts nothing, so an example whose answer starts at or past max_length has nothing to learn.
        flat = iter(encode_examples([r for group in groups for r in group], self.tokenizer, hp.template, hp.max_length))
        encoded = [[next(flat) for _ in group] for group in groups]
        kept_groups = [kept for kept in ([e for e in group if supervised_tokens(e) > 0] for group in encoded) if kept]
        kept = [e for group in kept_groups for e in group]
        self.no_answer = sum(map(len, encoded)) - len(kept)
        if self.no_answer:
            log.warning("skipped %d of %d training/validation example(s) with no answer token within data.max_length=%d "
                        "(the prompt fills it)", self.no_answer, len(kept) + self.no_answer, hp.max_length)
        if len(kept) <= hp.val_size:
            raise EarlyExitError(f"{len(kept)} of {len(encoded)} training examples have an answer token within "
                                 f"data.max_length={hp.max_length}, not more than data.val_size={hp.val_size}: nothing "
                                 "would train; raise data.max_length")
        if hp.teacher_cache:
            self._attach_teacher(kept)
        held = held_out_groups(kept_groups, hp.val_size)
        self.val_set = [e for group in kept_groups[:held] for e in group]
        self.train_set = [e for group in kept_groups[held:] for e in group]
        if not self.train_set:
            raise EarlyExitError(f"every training prompt went to validation (data.val_size={hp.val_size}, "
                                 f"{len(kept_groups)} prompts): lower data.val_size")

    def _attach_teacher(self, examples: list[dict]) -> None:
        """Give every example its cached teacher; a cache built for other examples is refused."""
        from earlyexit.teacher import example_key, load

        cache = load(self.hparams.teacher_cache)
        missing = 0
        for example in examples:
            entry = cache.get(example_key(example))
            if entry is None or entry[0].shape[0] != supervised_tokens(example):
                missing += 1
            else:
                example["teacher"] = entry
        if missing:
            raise EarlyExitError(f"teacher cache {self.hparams.teacher_cache!r} lacks {missing} of {len(examples)} training "
                                 "examples: it was built for other data options (source, max_length, template, eval_size) "
                                 "or another tokenizer; rebuild it with scripts/teacher_cache.py")

    def set_predict(self, pairs: list[tuple[int, dict]]) -> None:
        """Generation items of ``(id, record)`` pairs: the prompt tokens and the reference answer."""
        self.predict_set = [{"id": i, "prompt_ids": self.prompt_ids(r), "reference": r["output"]} for i, r in pairs]

    prompt_limit: int | None = None
    """The most prompt tokens the model's window leaves room for (:func:`earlyexit.answers.fit_answer_prompts`)."""

    def prompt_ids(self, record: dict) -> list[int]:
        """The prompt of ``record``, tokenised, keeping its last ``max_length`` tokens (and its last ``prompt_limit``)."""
        ids = encode_prompt(record, self.tokenizer, self.hparams.template)
        return ids[-min(self.hparams.max_length, self.prompt_limit or self.hparams.max_length) :]

    def collate_train(self, batch: list[dict]) -> dict:
        pad_id = self.tokenizer.pad_token_id
        if self.hparams.pack:
            return packed_batch(batch, self.hparams.max_length, pad_id)
        return padded_batch(batch, pad_id)

    def collate_predict(self, batch: list[dict]) -> dict:
        pad_id = self.tokenizer.pad_token_id
        return {
            "ids": [b["id"] for b in batch],
            "input_ids": pad([b["prompt_ids"] for b in batch], pad_id, "left"),
            "attention_mask": pad([[1] * len(b["prompt_ids"]) for b in batch], 0, "left"),
            "references": [b["reference"] for b in batch],
        }

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if world > 1 and len(self.train_set) < self.hparams.batch_size * world:
            raise EarlyExitError(f"{len(self.train_set)} training records are fewer than one global batch "
                                 f"({self.hparams.batch_size} × {world} ranks)")
        sampler = EpochSampler(len(self.train_set), self.hparams.seed, self.hparams.batch_size, rank, world)
        if trainer is not None:  # resuming mid-epoch: skip the batches the checkpoint already trained on
            sampler.set_epoch(trainer.current_epoch)
            # `ready` counts the batches a mid-epoch checkpoint already took (it is saved before `completed` moves)
            start = trainer.fit_loop.epoch_loop.batch_progress.current.ready * self.hparams.batch_size
            sampler.start = start if start < len(sampler) else 0
        return DataLoader(
            self.train_set, batch_size=self.hparams.batch_size, sampler=sampler,
            collate_fn=self.collate_train, num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, collate_fn=self.collate_train, num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.predict_set, batch_size=self.hparams.batch_size, collate_fn=self.collate_predict, num_workers=self.hparams.num_workers)
