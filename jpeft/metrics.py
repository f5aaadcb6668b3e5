"""GLUE's official metrics (scikit-learn and scipy), on a 0-1 scale."""

from __future__ import annotations

import numpy as np

from jpeft.data.glue import GlueTask, get_task


def glue_metrics(task: str | GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of ``task`` for logits ``(N, C)`` (argmax) or regression scores ``(N,)``/``(N, 1)``.

    CoLA: Matthews correlation; STS-B: Pearson and Spearman; MRPC/QQP: accuracy and F1; the rest:
    accuracy.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    task = get_task(task)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    if predictions.shape[0] != labels.shape[0]:
        raise ValueError(f"{predictions.shape[0]} predictions for {labels.shape[0]} labels")
    out: dict[str, float] = {}
    if task.is_regression:
        scores = predictions.reshape(predictions.shape[0], -1)[:, 0].astype(np.float64)
        constant = np.ptp(scores) == 0 or np.ptp(labels) == 0
        out["pearson"] = 0.0 if constant else float(pearsonr(scores, labels)[0])
        out["spearmanr"] = 0.0 if constant else float(spearmanr(scores, labels)[0])
        return out
    pred = predictions.argmax(-1) if predictions.ndim == 2 else predictions.astype(np.int64)
    for name in task.metric_names:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, pred))
        elif name == "f1":
            out[name] = float(f1_score(labels, pred))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, pred))
    return out


def majority_baseline(task: str | GlueTask, train_labels: np.ndarray, dev_labels: np.ndarray
                      ) -> dict[str, float]:
    """Metrics of always predicting the training majority class (the training mean for STS-B)."""
    task = get_task(task)
    dev_labels = np.asarray(dev_labels)
    if task.is_regression:
        return glue_metrics(task, np.full(len(dev_labels), np.mean(train_labels)), dev_labels)
    majority = int(np.bincount(np.asarray(train_labels, dtype=np.int64)).argmax())
    return glue_metrics(task, np.full(len(dev_labels), majority), dev_labels)
