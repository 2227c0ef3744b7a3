"""Context-grounded correctness per exit layer: a judge decides whether each layer's answer is correct.

Each record carries a question, a context (e.g. retrieved passages) and a reference answer; by default,
Alpaca records with a non-empty ``input``, which is the context. Each exit layer's answer comes from an
evaluation results directory (``--answers``; answers missing there are generated into it, with the
context in the prompt). A judge then grades every (example, layer) answer:

- ``openai``: any OpenAI-compatible chat-completions endpoint (``--judge.base_url``, ``--judge.model``),
  through the official ``openai`` client, temperature 0, the client's own bounded retries, a concurrency
  limit; the API key is read from the environment variable ``--judge.api_key_env`` only;
- ``local``: a Hugging Face model at full depth (default: the evaluated model itself);
- ``reference``: no LLM, for fully offline runs: normalised exact match or token F1 against the
  reference answer above a threshold. Reported as such, never as an LLM verdict.

LLM judges get the fixed prompt :data:`earlyexit.verdicts.JUDGE_PROMPT` and must reply ``{"correct": true|false}``;
anything that does not parse counts as *unparsable* (and so not correct). Verdicts are cached in a
JSONL file keyed by a hash of (judge, prompt): reruns ask nothing twice and a killed run resumes.

    python -m earlyexit.judge --config configs/smollm2_judge.yaml
    python -m earlyexit.judge --judge.kind openai --judge.model gpt-4o-mini --answers results/smollm2_layers
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from jsonargparse import ArgumentParser

from earlyexit.answers import (
    TrainerArgs,
    add_answer_options,
    check_evaluation_setup,
    fit_answer_prompts,
    generate_answers,
    generation_fingerprint,
)
from earlyexit.cli import make_parser, save_config
from earlyexit.data import SAMPLE, AlpacaDataModule, Template, read_records, validate
from earlyexit.errors import EarlyExitError, in_unit, non_negative, positive, report_errors, require
from earlyexit.generation import GenerationArgs
from earlyexit.loading import ModelArgs, resolve_device
from earlyexit.names import resolve_model_path
from earlyexit.model import parse_exit_layers
from earlyexit.module import EarlyExitModule
from earlyexit.network import is_loopback
from earlyexit.results import ResultsDir, markdown_table
from earlyexit.verdicts import (JUDGE_PROMPT, JUDGE_SHOTS, JUDGE_SYSTEM, Case, ReferenceJudge, VerdictCache, judge_cases,
                                parse_verdict, wilson)

DEFAULT_BASE_URL = "https://api.openai.com/v1"

@dataclass
class JudgeData:
    """Records with a question, a context and a reference answer.

    Args:
        source: ``alpaca-sample`` (the shipped Alpaca sample, default), a local JSON list / JSONL file, or a hub dataset id.
        question_field: field holding the question (Alpaca: ``instruction``).
        context_field: field holding the context (Alpaca: ``input``); records whose context is empty are skipped.
        answer_field: field holding the reference answer (Alpaca: ``output``).
        eval_size: records at the head of the source considered (the evaluation split, as in ``evaluate``).
        offset: first record with a context used.
        limit: number of records with a context used (all when None).
        template: prompt format for generation: alpaca, chat or auto (as ``evaluate``).
        max_length: prompt tokens kept for generation.
        batch_size: prompts per generation batch.
    """

    source: str = SAMPLE
    question_field: str = "instruction"
    context_field: str = "input"
    answer_field: str = "output"
    eval_size: int = 200
    offset: int = 0
    limit: int | None = None
    template: Template = "auto"
    max_length: int = 512
    batch_size: int = 8

    def __post_init__(self):
        non_negative("data.eval_size", self.eval_size)
        non_negative("data.offset", self.offset)
        positive("data.limit", self.limit, optional=True)
        positive("data.max_length", self.max_length)
        positive("data.batch_size", self.batch_size)

    @property
    def fields(self) -> tuple[str, str, str]:
        return self.question_field, self.context_field, self.answer_field


@dataclass
class JudgeArgs:
    """Who judges, and how.

    Args:
        kind: ``local`` (an HF model at full depth), ``openai`` (an OpenAI-compatible endpoint) or
            ``reference`` (exact match / token F1 against the reference: not an LLM judge).
        model: openai: the endpoint's model name (required); local: an HF id or path (default: the evaluated model, adapter included).
        dtype: local, with ``model``: the judge's weights (float32, bfloat16, float16; default: the evaluated model's).
            bfloat16 judges about 3× faster than float32 on a CPU with avx512_bf16.
        shots: LLM judges: the worked examples (:data:`earlyexit.verdicts.JUDGE_SHOTS`) come before each answer
            (about 900 tokens; false for a judge with a short window).
        base_url: openai: the endpoint (default https://api.openai.com/v1).
        api_key_env: openai: environment variable holding the API key (required unless the endpoint is on this machine).
        concurrency: openai: requests in flight at once.
        max_retries: openai: retries of a request after a 429, a 5xx, a timeout, a lost connection or a malformed body.
        timeout: openai: seconds before a request times out.
        max_tokens: LLM judges: tokens of the verdict reply (local with ``constrained``: unused).
        batch_size: local: prompts judged per batch.
        constrained: local: score only the two allowed replies, ``{"correct": true}`` against ``{"correct": false}``
            (the model's own preference between them), so that no verdict is ever unparsable; false: free generation.
        calibrate: LLM judges: before judging, judge the reference answers themselves (they must come out correct)
            and answers of other records (incorrect) on the same records (:mod:`earlyexit.calibration`); the table
            reports the rates and flags a judge that fails them.
        metric: reference: ``f1`` (token F1, SQuAD normalisation) or ``exact`` (normalised exact match).
        threshold: local, constrained: the P(true) against P(false) at or above which an answer counts as
            correct. Fit it on records you do not report on (``--calibrate`` prints the best one for its records).
        reference_threshold: reference: the token F1 at or above which an answer counts as correct (its own
            option: a config's LLM threshold never moves the reference judge's).
    """

    kind: Literal["local", "openai", "reference"] = "local"
    model: str | None = None
    dtype: str | None = None
    shots: bool = True
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    max_retries: int = 3
    timeout: float = 60.0
    max_tokens: int = 32
    batch_size: int = 16
    constrained: bool = True
    calibrate: bool = True
    metric: Literal["f1", "exact"] = "f1"
    threshold: float = 0.5
    reference_threshold: float = 0.5

    def __post_init__(self):
        positive("judge.concurrency", self.concurrency)
        non_negative("judge.max_retries", self.max_retries)
        require(self.timeout > 0, "judge.timeout", self.timeout, "> 0")
        positive("judge.max_tokens", self.max_tokens)
        positive("judge.batch_size", self.batch_size)
        in_unit("judge.threshold", self.threshold)
        in_unit("judge.reference_threshold", self.reference_threshold)
        require(self.dtype in (None, "float32", "bfloat16", "float16"), "judge.dtype", self.dtype, "float32, bfloat16 or float16")


# --- records -----------------------------------------------------------------------------------------


def load_items(data: JudgeData) -> list[tuple[int, dict]]:
    """``(id, record)`` pairs, records in Alpaca's shape (instruction = question, input = context, output = reference),
    validated by :func:`earlyexit.data.validate` (a bad record is an error naming it and the option that picks the
    field). Records with an empty context are skipped: there is nothing to ground the answer in.
    """
    raw = read_records(data.source)[: data.eval_size]
    try:
        loaded = validate(raw, strict=True, fields=data.fields)
    except EarlyExitError as err:
        hint = next((f" (set --data.{role}_field to the field that holds it)" for role, name in
                     zip(("question", "context", "answer"), data.fields) if repr(name) in str(err)), "")
        raise EarlyExitError(f"{data.source}: {err}{hint}") from None
    items = [(i, r) for i, r in zip(loaded.ids, loaded.records) if r["input"].strip()]
    end = None if data.limit is None else data.offset + data.limit
    chosen = items[data.offset : end]
    if not chosen:
        raise EarlyExitError(f"no record with a non-empty {data.context_field!r} in the first {data.eval_size} records of "
                             f"{data.source!r} (offset {data.offset}, limit {data.limit})")
    return chosen


# --- LLM judges -------------------------------------------------------------------------------------


class LocalJudge:
    """An HF model at full depth reading :data:`earlyexit.verdicts.JUDGE_PROMPT` through its chat template.

    ``constrained`` (the default): its reply is forced to ``{"correct": `` and its score is P(true) between ``true`` and
    ``false``; the answer is correct when the score reaches ``threshold``, so a verdict is never unparsable. Else a
    greedy reply of ``max_tokens`` tokens, parsed by :func:`parse_verdict`."""

    def __init__(self, lm, tokenizer, name: str, max_tokens: int = 32, batch_size: int = 16, constrained: bool = True,
                 threshold: float = 0.5, shots: bool = True):
        from earlyexit.model import EarlyExitHead

        self.ee, self.tokenizer = EarlyExitHead(lm), tokenizer
        self.max_tokens, self.batch_size, self.constrained, self.threshold = max_tokens, batch_size, constrained, threshold
        self.shots = shots
        self.name = f"local:{name}" + (":constrained" if constrained else "")  # no threshold in it: cached scores are decided again
        self.label = f"LLM judge: {name} (local, full depth, " + (f"correct when P(true) ≥ {threshold:g} against false)"
                                                                    if constrained else "greedy reply)")

    def decide(self, score: float) -> str:
        return "correct" if score >= self.threshold else "incorrect"

    def verdict_tokens(self) -> tuple[list[int], int, int]:
        """The reply's forced prefix and the first token of ``true`` and of ``false`` after it."""
        tok = self.tokenizer
        yes = tok('{"correct": true}', add_special_tokens=False)["input_ids"]
        no = tok('{"correct": false}', add_special_tokens=False)["input_ids"]
        common = next((k for k, (a, b) in enumerate(zip(yes, no)) if a != b), None)
        if common is None:
            raise EarlyExitError("the judge's tokenizer does not tell 'true' from 'false' apart: use --judge.constrained false")
        return yes[:common], yes[common], no[common]

    def replies(self, cases: list[Case], done) -> None:
        from earlyexit.data import encode_chat
        from earlyexit.tokens import pad

        tok = self.tokenizer
        device = next(self.ee.lm.parameters()).device
        prefix, yes, no = self.verdict_tokens() if self.constrained else ([], None, None)
        prompts = [encode_chat(case.messages(self.shots), tok) + prefix for case in cases]
        shared = self._shared(prompts, device) if self.constrained else None
        for start in range(0, len(cases), self.batch_size):
            chunk, encoded = cases[start : start + self.batch_size], prompts[start : start + self.batch_size]
            if self.constrained:
                sure = self._p_true(encoded, shared, yes, no, device)
                for row, case in enumerate(chunk):
                    p = float(sure[row])
                    verdict = self.decide(p)
                    done(case, verdict, f'{{"correct": {str(verdict == "correct").lower()}}} (P(true) = {p:.3f})', p)
                continue
            ids = pad(encoded, tok.pad_token_id, "left").to(device)
            mask = pad([[1] * len(e) for e in encoded], 0, "left").to(device)
            out = self.ee.generate(ids, mask, self.ee.n_layers, max_new_tokens=self.max_tokens, pad_token_id=tok.pad_token_id)
            for row, case in enumerate(chunk):
                reply = tok.decode(out.tokens[row, : int(out.n_tokens[row])].tolist(), skip_special_tokens=True)
                done(case, parse_verdict(reply), reply)

    SHARED_MIN = 64
    """The fewest tokens every prompt must share (the system prompt and the worked examples) to be run once."""

    @torch.inference_mode()
    def _shared(self, prompts: list[list[int]], device) -> tuple[int, object] | None:
        """The tokens every prompt starts with, run once: ``(length, their keys and values)``, or None if too few."""
        if len(prompts) < 2:
            return None
        length = min(len(p) for p in prompts) - 1  # at least one token of each prompt is its own
        first = prompts[0]
        for other in prompts[1:]:
            length = next((k for k in range(length) if other[k] != first[k]), length)
        if length < self.SHARED_MIN:
            return None
        out = self.ee.lm(input_ids=torch.tensor([first[:length]], device=device), use_cache=True)
        cache = out.get("cache")  # transformers ≥ 5.25; past_key_values before
        return length, out.get("past_key_values") if cache is None else cache

    @torch.inference_mode()
    def _p_true(self, prompts: list[list[int]], shared, yes: int, no: int, device) -> torch.Tensor:
        """P(true) against P(false) at each prompt's end, in one left-padded batch; after the ``shared`` tokens'
        keys and values (the rest of each prompt left-padded after them) when given."""
        from earlyexit.tokens import pad

        tok, lm = self.tokenizer, self.ee.lm
        length, cache = shared if shared is not None else (0, None)
        rest = [p[length:] for p in prompts]
        ids = pad(rest, tok.pad_token_id, "left").to(device)
        mask = pad([[1] * len(r) for r in rest], 0, "left").to(device)
        positions = length + (mask.cumsum(-1) - 1).clamp(min=0)
        past = {}
        if cache is not None:
            cache = copy.deepcopy(cache)
            cache.batch_repeat_interleave(len(prompts))
            mask = torch.cat([mask.new_ones(len(prompts), length), mask], dim=1)
            # transformers ≥ 5.25 names it cache (past_key_values is deprecated there); older ones past_key_values
            past = {"cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values": cache}
        logits = lm(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1,
                    **past).logits[:, -1].float()  # the head at the last position only
        return torch.softmax(logits[:, [yes, no]], -1)[:, 0]


class JudgeEndpointError(EarlyExitError):
    pass


class OpenAIJudge:
    """An OpenAI-compatible chat-completions endpoint, through the official client and its own bounded retries."""

    def __init__(self, args: JudgeArgs):
        import openai

        if not args.model:
            raise EarlyExitError("--judge.model is required with --judge.kind openai (the endpoint's model name)")
        self.base_url = args.base_url or DEFAULT_BASE_URL
        parsed = urlparse(self.base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise EarlyExitError(f"--judge.base_url {self.base_url!r} is not an http(s) URL")
        key = os.environ.get(args.api_key_env)
        if not key:
            if not is_loopback(parsed.hostname):
                raise EarlyExitError(f"the judge endpoint {self.base_url} needs an API key: set the environment variable "
                                     f"{args.api_key_env} (--judge.api_key_env); keys are read from the environment only")
            key = "unused"  # an endpoint on this machine may need none; the client insists on some value
        self.shots = args.shots
        self.client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=args.timeout, max_retries=args.max_retries)
        self.args = args
        self.name = f"openai:{self.base_url}:{args.model}"
        self.label = f"LLM judge: {args.model} at {self.base_url} (temperature 0)"

    def ask(self, messages: list[dict]) -> str:
        """The judge's reply. The client itself retries timeouts, lost connections, 408/409/429 and 5xx (``max_retries``
        times, with its own backoff); what is left becomes one :class:`JudgeEndpointError` line."""
        import openai

        args = self.args
        failed = f"the judge endpoint {self.base_url} failed {args.max_retries + 1} times; last:"
        try:
            response = self.client.chat.completions.create(
                model=args.model, messages=messages, temperature=0, max_tokens=args.max_tokens)
            content = response.choices[0].message.content
            if not isinstance(content, str):
                raise TypeError("no message content")
            return content
        except openai.APITimeoutError:
            raise JudgeEndpointError(f"{failed} timed out after {args.timeout:g} s") from None
        except openai.APIConnectionError as err:
            raise JudgeEndpointError(f"{failed} could not connect ({_cause(err)})") from None
        except openai.APIStatusError as err:
            if err.status_code in (408, 409, 429) or err.status_code >= 500:
                raise JudgeEndpointError(f"{failed} HTTP {err.status_code}: {_message(err)}") from None
            hint = f" (check {args.api_key_env})" if err.status_code in (401, 403) else ""
            raise JudgeEndpointError(f"the judge endpoint {self.base_url} refused the request: HTTP {err.status_code}: "
                                     f"{_message(err)}{hint}") from None
        except (ValueError, TypeError, AttributeError, IndexError, openai.APIResponseValidationError) as err:
            raise JudgeEndpointError(f"the judge endpoint {self.base_url} sent a malformed response "
                                     f"({type(err).__name__}: {err}); is it an OpenAI-compatible chat-completions endpoint?") from None

    def replies(self, cases: list[Case], done) -> None:
        stop = threading.Event()
        errors: list[JudgeEndpointError] = []

        def one(case: Case) -> None:
            if stop.is_set():
                return
            try:
                reply = self.ask(case.messages(self.shots))
            except JudgeEndpointError as err:
                errors.append(err)
                stop.set()
                return
            done(case, parse_verdict(reply), reply)

        with ThreadPoolExecutor(max_workers=max(1, self.args.concurrency)) as pool:
            list(pool.map(one, cases))
        if errors:
            raise errors[0]


def _cause(err: Exception) -> str:
    cause = err.__cause__ or err.__context__
    return f"{type(cause).__name__}: {cause}" if cause else str(err)


def _message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(err.message if hasattr(err, "message") else err)[:200]


# --- running -----------------------------------------------------------------------------------------


def tally(verdicts: dict[tuple[int, int], dict], exit_layers: list[int],
          reference: dict[tuple[int, int], str] | None = None) -> list[dict]:
    """Per layer: counts of each verdict, the share judged correct (unparsable counts as not correct), its interval, and
    with ``reference`` (the reference judge's verdicts) the share of answers on which the two agree."""
    rows = []
    for layer in exit_layers:
        mine = {key: v["verdict"] for key, v in verdicts.items() if key[1] == layer}
        counts = Counter(mine.values())
        n = sum(counts.values())
        rows.append({
            "layer": layer, "n": n, "correct": counts["correct"], "incorrect": counts["incorrect"],
            "unparsable": counts["unparsable"], "accuracy": counts["correct"] / n if n else 0.0,
            "accuracy_ci": list(wilson(counts["correct"], n)),
        })
        if reference is not None:
            rows[-1]["agreement_with_reference"] = sum(v == reference[key] for key, v in mine.items()) / max(1, n)
    return rows


def format_table(rows: list[dict]) -> str:
    """The seed's ``| Layer | Correct |`` table (share with its 95% interval), then the counts."""
    shares = [[r["layer"], f"{r['accuracy']:.1%} [{r['accuracy_ci'][0]:.1%}, {r['accuracy_ci'][1]:.1%}]"] for r in rows]
    agree = "agreement_with_reference" in rows[0] if rows else False
    counts = [[r["layer"], r["n"], r["correct"], r["incorrect"], r["unparsable"]]
              + ([f"{r['agreement_with_reference']:.1%}"] if agree else []) for r in rows]
    return (markdown_table(["Layer", "Correct"], shares) + "\n\n"
            + markdown_table(["Layer", "judged", "correct", "incorrect", "unparsable"]
                             + (["agreement with the reference judge"] if agree else []), counts))


def build_parser() -> ArgumentParser:
    parser = make_parser("python -m earlyexit.judge", __doc__)
    add_answer_options(parser, JudgeData)
    parser.add_class_arguments(JudgeArgs, "judge")
    parser.add_argument("--answers", type=str | None, default=None,
                        help="an evaluation results directory whose answers are reused; missing ones are generated into it "
                             "(default: <out_dir>/answers)")
    parser.add_argument("--cache", type=str | None, default=None, help="verdict cache file (default: <out_dir>/verdicts.jsonl)")
    parser.add_argument("--calibrate", type=bool, default=False,
                        help="only calibrate the judge on the records (earlyexit.calibration): no answers are generated")
    parser.add_argument("--out_dir", type=str, default="results/judge", help="where the table, metrics and figure go")
    return parser


def n_layers_of(model: ModelArgs) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(model.name)).num_hidden_layers


def make_judge(args: JudgeArgs, model: ModelArgs, module: EarlyExitModule | None):
    if args.kind == "reference":
        return ReferenceJudge(args.metric, args.reference_threshold)
    if args.kind == "openai":
        return OpenAIJudge(args)
    if args.model is None and module is not None:  # the evaluated model judges itself, at full depth
        lm, tokenizer, name = module.lm, module.tokenizer, model.name + (f"+{model.adapter}" if model.adapter else "")
    else:
        from earlyexit.loading import load_model

        judge_model = model if args.model is None else ModelArgs(name=args.model, dtype=args.dtype or model.dtype, device=model.device)
        lm, tokenizer = load_model(judge_model)
        name = judge_model.name + (f"+{judge_model.adapter}" if judge_model.adapter else "")
    return LocalJudge(lm, tokenizer, name, args.max_tokens, args.batch_size, args.constrained, args.threshold, args.shots)


def run(cfg, parser: ArgumentParser | None = None) -> dict:
    model_args, generation, trainer_args = ModelArgs(**cfg.model), GenerationArgs(**cfg.generation), TrainerArgs(**cfg.trainer)
    data_args, judge_args = JudgeData(**cfg.data), JudgeArgs(**cfg.judge)
    check_evaluation_setup(trainer_args)
    items = load_items(data_args)  # bad data fails before any model loads
    out_dir = Path(cfg.out_dir)
    if cfg.calibrate:
        return calibrate_only(judge_args, model_args, items, cfg, out_dir, parser)
    judge = make_judge(judge_args, model_args, None) if judge_args.kind != "local" else None  # a missing key fails early
    device = resolve_device(model_args.device)
    data = AlpacaDataModule(source=data_args.source, template=data_args.template, eval_size=data_args.eval_size,
                            max_length=data_args.max_length, batch_size=data_args.batch_size)
    default_fields = data_args.fields == (JudgeData.question_field, JudgeData.context_field, JudgeData.answer_field)
    fingerprint = generation_fingerprint(model_args, data, generation, device,
                                         **({} if default_fields else {"fields": list(data_args.fields)}))
    fit_answer_prompts(model_args, data, items, generation)  # prompts past the model's window, before it loads
    answers = ResultsDir(cfg.answers or out_dir / "answers", fingerprint)
    exit_layers = parse_exit_layers(cfg.exit_layers, n_layers_of(model_args))
    have = {(r["id"], r["layer"]) for r in answers.generations()}
    module = None
    if any((i, layer) not in have for i, _ in items for layer in exit_layers):
        module = EarlyExitModule(base=model_args, generation=generation, exit_layers=cfg.exit_layers)
        if not generate_answers(module, answers, data, items, trainer_args, device):
            return {}  # a sharded generation's other ranks: rank 0 judges
    if judge is None:
        judge = make_judge(judge_args, model_args, module)
    rows = {(r["id"], r["layer"]): r for r in answers.generations()}
    cases = [Case(i, layer, r["instruction"], r["input"], r["output"], rows[(i, layer)]["text"])
             for i, r in items for layer in exit_layers]
    cache = VerdictCache(cfg.cache or out_dir / "verdicts.jsonl")
    calibration = None
    if judge_args.calibrate and not isinstance(judge, ReferenceJudge):  # before its verdicts are trusted
        from earlyexit.calibration import calibrate

        calibration = calibrate(judge, items, cache)
    verdicts = judge_cases(judge, cases, cache)
    results = ResultsDir(out_dir, {"judge": judge.name, "answers": str(answers.path)})
    if parser is not None:
        save_config(parser, cfg, out_dir)
    report = {
        "judge": judge.name, "judge_label": judge.label, "model": model_args.name, "adapter": model_args.adapter,
        "answers": str(answers.path), "data": data_args.source, "n_examples": len(items),
        "example_ids": [i for i, _ in items], "prompt": {"system": JUDGE_SYSTEM, "user": JUDGE_PROMPT, "shots": JUDGE_SHOTS},
        "calibration": calibration,
        "layers": tally(verdicts, exit_layers, None if isinstance(judge, ReferenceJudge) else reference_verdicts(cases)),
    }
    results.write_metrics(report)
    table = format_table(report["layers"])
    heading = f"Judge: {judge.label}; {len(items)} records with a context."
    if calibration is not None:
        from earlyexit.calibration import describe

        heading += f"\n{describe(calibration)}"
    results.write_text("table.md", f"{heading}\n\n{table}\n")
    results.write_text("judgements.jsonl", "".join(
        json.dumps({"id": c.id, "layer": c.layer, "answer": c.answer, **verdicts[(c.id, c.layer)]}, ensure_ascii=False) + "\n"
        for c in cases))
    write_plot(results.path / "correct.png", report)
    print(f"{heading}\n\n{table}")
    print(f"\nresults: {results.path}", file=sys.stderr)
    return report


def calibrate_only(judge_args: JudgeArgs, model_args: ModelArgs, items, cfg, out_dir: Path, parser) -> dict:
    """``--calibrate``: the judge on the calibration cases of ``items`` alone; prints and writes ``calibration.json``."""
    from earlyexit.calibration import calibrate, describe

    if judge_args.kind == "reference":
        raise EarlyExitError("--calibrate calibrates an LLM judge: set --judge.kind local or openai")
    judge = make_judge(judge_args, model_args, None)
    results = ResultsDir(out_dir, {"calibration": judge.name})
    if parser is not None:
        save_config(parser, cfg, out_dir)
    report = calibrate(judge, items, VerdictCache(cfg.cache or out_dir / "verdicts.jsonl"))
    results.write_text("calibration.json", json.dumps(report, indent=2) + "\n")
    print(f"Judge: {judge.label}\n{describe(report)}")
    return report


def reference_verdicts(cases: list[Case]) -> dict[tuple[int, int], str]:
    """The reference judge's verdict on each case (no LLM): what an LLM judge's agreement is measured against."""
    out: dict[tuple[int, int], str] = {}
    ReferenceJudge().replies(cases, lambda case, verdict, reply: out.__setitem__((case.id, case.layer), verdict))
    return out


def write_plot(path: Path, report: dict) -> None:
    from earlyexit.plotting import metrics_by_layer

    rows = report["layers"]
    fig = metrics_by_layer([r["layer"] for r in rows], {"correct": [r["accuracy"] for r in rows]},
                           {"correct": [tuple(r["accuracy_ci"]) for r in rows]},
                           title=f"{report['model']} — {report['judge_label']}")
    fig.savefig(path, dpi=120)


@report_errors
def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    cfg = parser.parse_args(argv)
    run(cfg, parser)


if __name__ == "__main__":
    main()
