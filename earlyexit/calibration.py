"""A judge calibrated before it is trusted: on the records with a context, the reference answers themselves must be judged
correct and answers taken from other records must be judged incorrect.

``python -m earlyexit.judge --calibrate`` prints the judge's true-positive rate (reference answers judged correct), its
true-negative rate (other records' answers judged incorrect), each with its 95% Wilson interval, the verdicts it could
not give (unparsable), and how often it agrees with the reference judge (token F1 ≥ 0.5, no LLM) on the same answers.
A judge passes with both rates at least :data:`TARGET` and no unparsable verdict; an LLM judge's per-layer table
carries its calibration in its heading and says so when it fails. A judge that scores its verdicts (a constrained local
judge: P(true)) also gets the threshold that would balance the two rates best on these records (:func:`best_threshold`):
fit it on training records, then calibrate on the records you report on with it.
"""

from __future__ import annotations

from earlyexit.verdicts import Case, ReferenceJudge, VerdictCache, judge_cases, wilson

REFERENCE, OTHER = 0, -1
"""The ``layer`` of a calibration case: the record's own reference answer, or another record's."""

TARGET = 0.9
"""The least true-positive and true-negative rate of a judge that passes."""


def calibration_cases(items: list[tuple[int, dict]]) -> list[Case]:
    """Each record with its own reference answer (to be judged correct) and with the next record's (incorrect)."""
    cases = [Case(i, REFERENCE, r["instruction"], r["input"], r["output"], r["output"]) for i, r in items]
    if len(items) > 1:
        cases += [Case(i, OTHER, r["instruction"], r["input"], r["output"], items[(k + 1) % len(items)][1]["output"])
                  for k, (i, r) in enumerate(items)]
    return cases


def calibrate(judge, items: list[tuple[int, dict]], cache: VerdictCache) -> dict:
    """Judge the calibration cases of ``items`` (verdicts cached, so a rerun asks nothing twice) and report the rates."""
    cases = calibration_cases(items)
    verdicts = judge_cases(judge, cases, cache)
    reference: dict[tuple[int, int], str] = {}
    ReferenceJudge().replies(cases, lambda case, verdict, reply: reference.__setitem__((case.id, case.layer), verdict))
    own = [verdicts[(c.id, c.layer)]["verdict"] for c in cases if c.layer == REFERENCE]
    other = [verdicts[(c.id, c.layer)]["verdict"] for c in cases if c.layer == OTHER]
    scores = {side: [verdicts[(c.id, c.layer)]["score"] for c in cases if c.layer == side] for side in (REFERENCE, OTHER)}
    scored = all(x is not None for x in scores[REFERENCE] + scores[OTHER]) and scores[OTHER]
    positive, negative = own.count("correct"), other.count("incorrect")
    unparsable = sum(v["verdict"] == "unparsable" for v in verdicts.values())
    tpr, tnr = positive / max(1, len(own)), negative / max(1, len(other))
    return {
        "judge": judge.name, "records": len(items),
        "true_positive_rate": tpr, "true_positive_ci": list(wilson(positive, len(own))),
        "true_negative_rate": tnr, "true_negative_ci": list(wilson(negative, len(other))),
        "unparsable": unparsable,
        "agreement_with_reference": sum(verdicts[key]["verdict"] == reference[key] for key in verdicts) / max(1, len(verdicts)),
        "target": TARGET, "passed": bool(other) and tpr >= TARGET and tnr >= TARGET and unparsable == 0,
        "threshold": getattr(judge, "threshold", None),
        "best_threshold": best_threshold(scores[REFERENCE], scores[OTHER]) if scored else None,
    }


def best_threshold(own: list[float], other: list[float]) -> dict:
    """The score threshold (an answer is correct at or above it) that best balances the two rates on these scores: the
    largest least rate, then the largest sum; midway between two neighbouring scores. Fit on records you do not report on."""
    values = sorted(set(own + other))
    cuts = [values[0] / 2] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [(values[-1] + 1) / 2]

    def rates(cut: float) -> tuple[float, float]:
        return sum(x >= cut for x in own) / len(own), sum(x < cut for x in other) / len(other)

    cut = max(cuts, key=lambda c: (min(rates(c)), sum(rates(c))))
    tpr, tnr = rates(cut)
    return {"threshold": cut, "true_positive_rate": tpr, "true_negative_rate": tnr}


def describe(report: dict) -> str:
    """One line: the rates, their intervals, and whether the judge passes."""
    lo_p, hi_p = report["true_positive_ci"]
    lo_n, hi_n = report["true_negative_ci"]
    verdict = ("passed" if report["passed"] else
               f"FAILED (needs ≥ {report['target']:.0%} of each and no unparsable verdict): do not trust its verdicts")
    return (f"calibration on {report['records']} records with a context: reference answers judged correct "
            f"{report['true_positive_rate']:.1%} [{lo_p:.1%}, {hi_p:.1%}], other records' answers judged incorrect "
            f"{report['true_negative_rate']:.1%} [{lo_n:.1%}, {hi_n:.1%}], unparsable {report['unparsable']}, agreement "
            f"with the reference judge {report['agreement_with_reference']:.1%}"
            + (f" at threshold {report['threshold']:g}" if report.get("threshold") is not None else "") + f" — {verdict}"
            + (f"; on these records threshold {best['threshold']:.3f} would balance them best ({best['true_positive_rate']:.1%}"
               f" and {best['true_negative_rate']:.1%}): fit it on records you do not report on"
               if (best := report.get("best_threshold")) else ""))
