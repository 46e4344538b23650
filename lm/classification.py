"""Scoring a classifier on a labelled corpus, and the classical baseline a practitioner tries first.

Scores (`scores`) are scikit-learn's: accuracy, and per label precision, recall and F1 with their macro average;
for two labels the second one (``labels[1]``, e.g. 'spam') is the positive class whose precision, recall and F1
are also given flat. The confusion matrix has one row per true label and one column per predicted label, in
``labels`` order.

The baseline (`fit_baseline`) is TF-IDF over character n-grams (inside word boundaries: ``char_wb``) and a
logistic regression, its inverse regularisation C picked on the val split from a grid; what a spam filter built
in an afternoon looks like, and the bar the fine-tuned language models must clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lm.config import BaselineConfig

Example = tuple[str, str]


def metrics_stem(baseline: str) -> str:
    """The name of a baseline's metrics file in metrics/ (beside the runs' <run>.json): baseline-<name>."""
    return f"baseline-{baseline}"


def scores(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 per label, macro and (two labels) of the positive class, the confusion matrix
    (rows: true, columns: predicted, `labels` order) and the number of examples."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels = list(labels)
    p, r, f, n = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "examples": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(np.mean(f)),
        "per_label": {
            x: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(n[i])}
            for i, x in enumerate(labels)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if len(labels) == 2:
        out |= {k: out["per_label"][labels[1]][k] for k in ("precision", "recall", "f1")}
    return out


def fit_baseline(splits: dict[str, list[Example]], cfg: BaselineConfig, seed: int):
    """TF-IDF + logistic regression trained on ``splits['train']``, C chosen by val accuracy (ties: the smaller C,
    the simpler model). Returns the fitted pipeline and the val accuracy of each C."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    xs, ys = [text for _, text in splits["train"]], [label for label, _ in splits["train"]]
    val_x, val_y = [text for _, text in splits["val"]], [label for label, _ in splits["val"]]
    tried, models = {}, {}
    for c in sorted(cfg.C):
        models[c] = make_pipeline(
            TfidfVectorizer(analyzer=cfg.analyzer, ngram_range=(cfg.ngram_min, cfg.ngram_max), sublinear_tf=True),
            LogisticRegression(C=c, max_iter=2000, random_state=seed),
        ).fit(xs, ys)
        tried[c] = float(np.mean(models[c].predict(val_x) == np.asarray(val_y)))
    best = max(tried, key=lambda c: (tried[c], -c))  # ties: the smaller C
    return models[best], tried


def score_splits(predict, splits: dict[str, list[Example]], labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`scores` of `predict` (texts → labels) on every split."""
    out = {}
    for name, examples in splits.items():
        texts = [text for _, text in examples]
        out[name] = scores([label for label, _ in examples], list(predict(texts)), labels)
    return out
