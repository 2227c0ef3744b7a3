"""A judge calibrated before it is trusted: on the records with a context, the reference answers themselves must be judged
correct, and answers taken from other records and degenerate answers (a few of the reference's own words repeated, as
an exit that has not learned to answer writes them) must be judged incorrect.

``python -m earlyexit.judge --calibrate`` prints the judge's true-positive rate (reference answers judged correct), its
true-negative rates (other records' answers, degenerate answers judged incorrect), each with its 95% Wilson interval,
the verdicts it could not give (unparsable), and how often it agrees with the reference judge (token F1 ≥ 0.5, no LLM)
on the same answers. A judge passes with every rate at least :data:`TARGET` and no unparsable verdict; an LLM judge's
per-layer table carries its calibration in its heading and says so when it fails. A judge that scores its verdicts (a
constrained local judge: P(true)) also gets the threshold that would balance the rates best on these records
(:func:`best_threshold`): fit it on training records, then calibrate on the records you report on with it.
"""

from __future__ import annotations

from earlyexit.verdicts import Case, ReferenceJudge, VerdictCache, judge_cases, wilson

REFERENCE, OTHER, DEGENERATE = 0, -1, -2
"""The ``layer`` of a calibration case: the record's own reference answer, another record's, or a degenerate one."""

CLASSES = {REFERENCE: ("true_positive", "correct", "reference answers judged correct"),
           OTHER: ("true_negative", "incorrect", "other records' answers judged incorrect"),
           DEGENERATE: ("degenerate_negative", "incorrect", "degenerate answers judged incorrect")}
"""Each kind of calibration case: its report key, the verdict it must get, and how the report names the rate."""

TARGET = 0.9
"""The least rate of each kind of case of a judge that passes."""


def degenerate(reference: str) -> str:
    """The first four words of ``reference`` repeated to its length (at least 12 words): the loop an exit that cannot
    answer yet falls into, sharing words with the reference."""
    words = reference.split()
    seed = words[:4] or ["the"]
    length = max(12, len(words))
    return " ".join(seed[k % len(seed)] for k in range(length))


def calibration_cases(items: list[tuple[int, dict]]) -> list[Case]:
    """Each record with its own reference answer (to be judged correct), with the next record's and with a degenerate
    one (both incorrect)."""
    cases = [Case(i, REFERENCE, r["instruction"], r["input"], r["output"], r["output"]) for i, r in items]
    if len(items) > 1:
        cases += [Case(i, OTHER, r["instruction"], r["input"], r["output"], items[(k + 1) % len(items)][1]["output"])
                  for k, (i, r) in enumerate(items)]
    cases += [Case(i, DEGENERATE, r["instruction"], r["input"], r["output"], degenerate(r["output"])) for i, r in items]
    return cases


def calibrate(judge, items: list[tuple[int, dict]], cache: VerdictCache) -> dict:
    """Judge the calibration cases of ``items`` (verdicts cached, so a rerun asks nothing twice) and report the rates."""
    cases = calibration_cases(items)
    verdicts = judge_cases(judge, cases, cache)
    reference: dict[tuple[int, int], str] = {}
    ReferenceJudge().replies(cases, lambda case, verdict, reply: reference.__setitem__((case.id, case.layer), verdict))
    report = {"judge": judge.name, "records": len(items)}
    passed, scores = bool(len(items) > 1), {}
    for kind, (key, wanted, _) in CLASSES.items():
        got = [verdicts[(c.id, c.layer)] for c in cases if c.layer == kind]
        hits = sum(v["verdict"] == wanted for v in got)
        rate = hits / max(1, len(got))
        report[f"{key}_rate"], report[f"{key}_ci"] = rate, list(wilson(hits, len(got)))
        passed = passed and bool(got) and rate >= TARGET
        scores[kind] = [v["score"] for v in got]
    unparsable = sum(v["verdict"] == "unparsable" for v in verdicts.values())
    scored = all(x is not None for side in scores.values() for x in side) and all(scores.values())
    return report | {
        "unparsable": unparsable,
        "agreement_with_reference": sum(verdicts[key]["verdict"] == reference[key] for key in verdicts) / max(1, len(verdicts)),
        "target": TARGET, "passed": passed and unparsable == 0,
        "threshold": getattr(judge, "threshold", None),
        "best_threshold": best_threshold(scores[REFERENCE], scores[OTHER], scores[DEGENERATE]) if scored else None,
    }


def best_threshold(positive: list[float], *negatives: list[float]) -> dict:
    """The score threshold (an answer is correct at or above it) that best balances the rates on these scores: the
    largest least rate of ``positive`` judged correct and the first list of ``negatives`` judged incorrect (the kinds
    a judge must pass: reference answers and other records'), then the largest least rate of every list (degenerate
    answers too), then the largest sum; midway between two neighbouring scores. Fit on records you do not report on."""
    values = sorted(set(positive).union(*negatives))
    cuts = [values[0] / 2] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [(values[-1] + 1) / 2]

    def rates(cut: float) -> list[float]:
        return [sum(x >= cut for x in positive) / len(positive)] + [sum(x < cut for x in side) / len(side) for side in negatives]

    cut = max(cuts, key=lambda c: (min(rates(c)[:2]), min(rates(c)), sum(rates(c))))
    return {"threshold": cut, "rates": rates(cut)}


def describe(report: dict) -> str:
    """One line: the rates, their intervals, and whether the judge passes."""
    parts = []
    for key, _, name in CLASSES.values():
        low, high = report[f"{key}_ci"]
        parts.append(f"{name} {report[f'{key}_rate']:.1%} [{low:.1%}, {high:.1%}]")
    verdict = ("passed" if report["passed"] else
               f"FAILED (needs ≥ {report['target']:.0%} of each and no unparsable verdict): do not trust its verdicts")
    best = report.get("best_threshold")
    return (f"calibration on {report['records']} records with a context: {', '.join(parts)}, unparsable "
            f"{report['unparsable']}, agreement with the reference judge {report['agreement_with_reference']:.1%}"
            + (f" at threshold {report['threshold']:g}" if report.get("threshold") is not None else "") + f" — {verdict}"
            + (f"; on these records threshold {best['threshold']:.3f} would balance them best "
               f"({', '.join(f'{rate:.1%}' for rate in best['rates'])}): fit it on records you do not report on"
               if best else ""))
