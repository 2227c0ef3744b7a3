"""Verdicts on answers: the judge's prompt, reading a reply, the verdict cache, the reference judge (no LLM), asking a
judge for many answers at once, and the interval of a share.

The LLM judges themselves and the per-layer table are in :mod:`earlyexit.judge`; calibration in
:mod:`earlyexit.calibration`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from earlyexit.errors import EarlyExitError
from earlyexit.results import append_jsonl, drop_torn_tail

Verdict = Literal["correct", "incorrect", "unparsable"]

JUDGE_SYSTEM = "You check answers against a reference answer. Reply with JSON only."
JUDGE_PROMPT = """Question:
{question}

Context:
{context}

Reference answer (correct):
{reference}

Answer to check:
{answer}

Does the answer to check give the same answer as the reference answer? Its wording may differ. If it says something else, or is empty, off-topic or repetitive, it does not. Reply with exactly one JSON object: {{"correct": true}} if it gives the same answer, {{"correct": false}} if not."""

JUDGE_SHOTS: list[tuple[str, str, str, str, bool]] = [
    ("Classify the sentiment of the review as positive or negative.", "The battery died after two days.", "Negative",
     "Negative", True),
    ("Rewrite the sentence in the passive voice.", "The committee approved the budget.",
     "The budget was approved by the committee.", "The committee approves budgets every year.", False),
    ("Convert the temperature to Fahrenheit.", "25 degrees Celsius", "77 degrees Fahrenheit", "25°C is 77°F.", True),
    ("Summarize the paragraph in one sentence.",
     "Bees carry pollen from flower to flower, and many of the crops farmers grow depend on them.",
     "Bees matter to farming because they pollinate crops.",
     "Bees carry Bees carry Bees carry Bees carry Bees carry Bees carry", False),
    ("Translate the sentence into French.", "Good morning, everyone.", "Bonjour à tous.",
     "The Great Wall of China is more than 20,000 kilometres long.", False),
    ("Give two synonyms of the word.", "happy", "Joyful, cheerful", "1. Joyful\n2. Cheerful", True),
    ("What is the capital of the country?", "Australia", "Canberra",
     "The capital is the capital is the capital is the capital is", False),
]
"""Worked examples the judge reads before the answer it grades, each ``(question, context, reference, answer,
correct)``: our own, from no dataset. Without them Qwen2.5-Coder-1.5B judged a verbatim copy of the reference answer
correct with P(true) as low as 0.26 (it graded the task, not the comparison); with the first six of them, on 12
training records, every reference answer scored 0.74 or more and 11 of 12 other records' answers below 0.5
(docs/evaluation.md)."""


@dataclass
class Case:
    """One answer to grade: example ``id`` at exit ``layer``, and the judge's messages for it."""

    id: int
    layer: int
    question: str
    context: str
    reference: str
    answer: str

    def messages(self, shots: bool = True) -> list[dict]:
        """The system prompt, the worked examples (:data:`JUDGE_SHOTS`, unless ``shots`` is false) as earlier turns, then
        this answer."""
        turns = [{"role": "system", "content": JUDGE_SYSTEM}]
        for question, context, reference, answer, correct in JUDGE_SHOTS if shots else ():
            turns.append({"role": "user", "content": JUDGE_PROMPT.format(question=question, context=context,
                                                                         reference=reference, answer=answer)})
            turns.append({"role": "assistant", "content": json.dumps({"correct": correct})})
        user = JUDGE_PROMPT.format(context=self.context, question=self.question, reference=self.reference, answer=self.answer)
        return turns + [{"role": "user", "content": user}]


def parse_verdict(text: str) -> Verdict:
    """A judge's reply → verdict: a JSON ``{"correct": bool}`` anywhere, else a leading yes/no/correct/incorrect.

    A JSON object whose ``correct`` is not a boolean, or any other reply, is ``unparsable``: never read as correct.
    """
    for match in re.finditer(r"\{[^{}]*\}", text):
        try:
            obj = json.loads(match.group())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "correct" in obj:
            return ("correct" if obj["correct"] else "incorrect") if isinstance(obj["correct"], bool) else "unparsable"
    word = re.match(r"[\s*_`'\"#>-]*(yes|no|correct|incorrect|true|false)\b(?![\"'])", text, re.IGNORECASE)
    if word:
        return "correct" if word.group(1).lower() in ("yes", "correct", "true") else "incorrect"
    return "unparsable"


def normalize(text: str) -> list[str]:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces; as tokens."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(answer: str, reference: str) -> float:
    pred, gold = normalize(answer), normalize(reference)
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


class VerdictCache:
    """Verdicts on disk, one JSON line each, keyed by a hash of (judge, prompt); appended and fsynced one by one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        drop_torn_tail(self.path)
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
        self.lock = threading.Lock()

    @staticmethod
    def key(judge: str, messages: list[dict]) -> str:
        return hashlib.sha256(json.dumps([judge, messages], ensure_ascii=False).encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def add(self, key: str, judge: str, verdict: Verdict, reply: str, score: float | None = None) -> None:
        entry = {"key": key, "judge": judge, "verdict": verdict, "reply": reply} | ({} if score is None else {"score": score})
        with self.lock:
            append_jsonl(self.path, [entry])
            self.entries[key] = entry


# --- judges ------------------------------------------------------------------------------------------


class ReferenceJudge:
    """Not an LLM: an answer is correct when its token F1 (or normalised exact match) with the reference passes a threshold."""

    def __init__(self, metric: str = "f1", threshold: float = 0.5):
        self.metric, self.threshold = metric, threshold
        self.name = f"reference:{metric}" + (f">={threshold:g}" if metric == "f1" else "")
        self.label = (f"reference-based (token F1 ≥ {threshold:g} against the reference answer; not an LLM judge)"
                      if metric == "f1" else "reference-based (normalised exact match; not an LLM judge)")

    def replies(self, cases: list[Case], done) -> None:
        for case in cases:
            if self.metric == "exact":
                score = float(normalize(case.answer) == normalize(case.reference))
                correct = score == 1.0
            else:
                score = token_f1(case.answer, case.reference)
                correct = score >= self.threshold
            done(case, "correct" if correct else "incorrect", f"{self.metric}={score:.4f}")


def judge_cases(judge, cases: list[Case], cache: VerdictCache) -> dict[tuple[int, int], dict]:
    """Verdicts for all ``cases``: cached ones are reused, the rest asked and cached one by one.

    Returns ``{(id, layer): {"verdict", "reply", "score"}}``. A judge that scores (a constrained local judge: P(true))
    leaves its score in the cache, and a cached score is decided again by ``judge.decide``: a new threshold asks nothing
    again. If the judge fails, every verdict obtained so far is already in the cache and the error says so.
    """
    out, todo = {}, {}
    for case in cases:
        key = VerdictCache.key(judge.name, case.messages(getattr(judge, "shots", True)))
        hit = cache.get(key)
        if hit:
            score = hit.get("score")
            verdict = hit["verdict"] if score is None else judge.decide(score)
            out[(case.id, case.layer)] = {"verdict": verdict, "reply": hit["reply"], "score": score}
        else:
            todo.setdefault(key, []).append(case)  # identical prompts (two layers, same answer) are asked once
    keys = {id(group[0]): key for key, group in todo.items()}
    lock = threading.Lock()

    def done(case: Case, verdict: Verdict, reply: str, score: float | None = None) -> None:
        key = keys[id(case)]
        cache.add(key, judge.name, verdict, reply, score)
        with lock:
            for same in todo[key]:
                out[(same.id, same.layer)] = {"verdict": verdict, "reply": reply, "score": score}

    print(f"{len(cases)} answers to judge; {len(out)} verdicts cached in {cache.path}", file=sys.stderr)
    try:
        judge.replies([group[0] for group in todo.values()], done)
    except EarlyExitError as err:
        got = len(out)
        raise EarlyExitError(f"{err}; {got} of {len(cases)} verdicts are kept in {cache.path} (a rerun resumes from there)") from None
    return out


def wilson(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


