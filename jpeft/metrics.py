"""GLUE's official metrics (scikit-learn and scipy), as python floats on a 0-1 scale."""

from __future__ import annotations

import math

import numpy as np

from jpeft.data.glue import GlueTask, get_task


def _finite(x: float) -> float:
    """A correlation of a constant input is undefined (nan); report it as 0.0."""
    x = float(x)
    return x if math.isfinite(x) else 0.0


def glue_metrics(task: str | GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The metrics of ``task`` (keys: exactly ``task.metric_names``).

    ``predictions``: logits ``(N, C)`` (argmax is taken) or class ids ``(N,)`` for classification;
    scores ``(N,)`` or ``(N, 1)`` for regression (STS-B). CoLA: Matthews correlation; STS-B:
    Pearson and Spearman (0.0 when either side is constant); MRPC/QQP: accuracy and F1 of class 1;
    the rest: accuracy.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    task = get_task(task)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels")
    if labels.shape[0] == 0:
        raise ValueError("no examples to score")
    if task.is_regression:
        scores = predictions.reshape(predictions.shape[0], -1)
        if scores.shape[1] != 1:
            raise ValueError(f"regression predictions must be (N,) or (N, 1), got {predictions.shape}")
        scores = scores[:, 0].astype(np.float64)
        gold = labels.astype(np.float64)
        if np.ptp(scores) == 0 or np.ptp(gold) == 0:
            return {"pearson": 0.0, "spearmanr": 0.0}
        return {"pearson": _finite(pearsonr(scores, gold)[0]),
                "spearmanr": _finite(spearmanr(scores, gold)[0])}
    pred = predictions.argmax(-1) if predictions.ndim == 2 else predictions
    pred = np.asarray(pred).astype(np.int64)
    gold = labels.astype(np.int64)
    out: dict[str, float] = {}
    for name in task.metric_names:
        if name == "accuracy":
            out[name] = float(accuracy_score(gold, pred))
        elif name == "f1":
            out[name] = float(f1_score(gold, pred, zero_division=0.0))
        elif name == "matthews_correlation":
            out[name] = _finite(matthews_corrcoef(gold, pred))
        else:  # pragma: no cover - GLUE_TASKS only names the metrics above
            raise ValueError(f"unknown metric {name!r}")
    return out


def majority_baseline(task: str | GlueTask, train_labels: np.ndarray, dev_labels: np.ndarray
                      ) -> dict[str, float]:
    """Dev metrics of always predicting the training majority class (the training mean for STS-B,
    whose correlations are then 0.0)."""
    task = get_task(task)
    dev_labels = np.asarray(dev_labels)
    if task.is_regression:
        mean = float(np.mean(np.asarray(train_labels, dtype=np.float64)))
        return glue_metrics(task, np.full(len(dev_labels), mean), dev_labels)
    majority = int(np.bincount(np.asarray(train_labels, dtype=np.int64)).argmax())
    return glue_metrics(task, np.full(len(dev_labels), majority), dev_labels)
