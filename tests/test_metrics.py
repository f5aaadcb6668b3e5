"""GLUE metrics against values computed by hand."""

import math

import numpy as np
import pytest

from jpeft.data.glue import GLUE_TASKS
from jpeft.metrics import glue_metrics, majority_baseline


def _logits(pred: list[int], num_classes: int = 2) -> np.ndarray:
    return np.eye(num_classes)[pred] * 3.0 - 1.0


def test_matthews_on_known_confusion_matrix():
    # tp=3 tn=2 fp=1 fn=1 -> mcc = (3*2 - 1*1) / sqrt((3+1)(3+1)(2+1)(2+1)) = 5/12
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    pred = [1, 1, 1, 0, 0, 0, 1]
    m = glue_metrics("cola", _logits(pred), labels)
    assert m == {"matthews_correlation": pytest.approx(5 / 12)}
    assert isinstance(m["matthews_correlation"], float)
    # class ids work as well as logits; perfect and inverted predictions give +1 / -1
    assert glue_metrics("CoLA", np.array(pred), labels)["matthews_correlation"] == pytest.approx(5 / 12)
    assert glue_metrics("cola", labels, labels)["matthews_correlation"] == pytest.approx(1.0)
    assert glue_metrics("cola", 1 - labels, labels)["matthews_correlation"] == pytest.approx(-1.0)
    # a constant prediction has no correlation: 0.0, not nan
    assert glue_metrics("cola", np.ones(7, int), labels)["matthews_correlation"] == 0.0


def test_accuracy_and_f1():
    labels = np.array([1, 0, 1, 1, 0])
    pred = [1, 0, 0, 1, 1]  # tp=2 fp=1 fn=1 tn=1: acc 3/5, precision 2/3, recall 2/3, f1 2/3
    m = glue_metrics("mrpc", _logits(pred), labels)
    assert list(m) == ["accuracy", "f1"]
    assert m["accuracy"] == pytest.approx(0.6) and m["f1"] == pytest.approx(2 / 3)
    assert glue_metrics("qqp", _logits(pred), labels) == m
    assert glue_metrics("sst2", _logits(pred), labels) == {"accuracy": pytest.approx(0.6)}
    # three classes (MNLI): argmax over the last axis
    logits = np.array([[0.1, 0.7, 0.2], [0.9, 0.0, 0.1], [0.2, 0.3, 0.5], [0.0, 0.1, 0.0]])
    assert glue_metrics("mnli", logits, np.array([1, 0, 1, 2])) == {"accuracy": 0.5}
    # no predicted positives: f1 is 0.0 without a warning-turned-nan
    assert glue_metrics("mrpc", np.zeros(3, int), np.array([1, 0, 1]))["f1"] == 0.0


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_keys_are_the_task_metric_names(task):
    spec = GLUE_TASKS[task]
    rng = np.random.default_rng(0)
    if spec.is_regression:
        labels, preds = rng.uniform(0, 5, 20), rng.normal(size=(20, 1))
    else:
        labels, preds = rng.integers(0, spec.num_labels, 20), rng.normal(size=(20, spec.num_labels))
    m = glue_metrics(task, preds, labels)
    assert tuple(m) == spec.metric_names and spec.main_metric in m
    assert all(type(v) is float and -1.0 <= v <= 1.0 for v in m.values())


def test_regression_metrics():
    labels = np.array([0.0, 1.0, 2.0, 3.0])
    scores = np.array([0.1, 0.9, 2.5, 2.4])
    # ranks of scores: 1 2 4 3 vs 1 2 3 4 -> spearman = 1 - 6*(0+0+1+1)/(4*15) = 0.8
    x, y = scores - scores.mean(), labels - labels.mean()
    pearson = (x @ y) / math.sqrt((x @ x) * (y @ y))
    for preds in (scores, scores[:, None]):  # (N,) and (N, 1)
        m = glue_metrics("stsb", preds, labels)
        assert list(m) == ["pearson", "spearmanr"]
        assert m["spearmanr"] == pytest.approx(0.8) and m["pearson"] == pytest.approx(pearson)
    assert glue_metrics("stsb", np.ones(4), labels) == {"pearson": 0.0, "spearmanr": 0.0}
    with pytest.raises(ValueError, match=r"\(N,\) or \(N, 1\)"):
        glue_metrics("stsb", np.zeros((4, 2)), labels)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 predictions for 4 labels"):
        glue_metrics("sst2", np.zeros((3, 2)), np.zeros(4))


def test_majority_baseline():
    assert majority_baseline("sst2", np.array([1, 1, 0]), np.array([1, 0, 0, 0])) == {"accuracy": 0.25}
    assert majority_baseline("rte", [0, 1, 1, 1], [1, 1, 0]) == {"accuracy": pytest.approx(2 / 3)}
    m = majority_baseline("mrpc", np.array([1, 1, 0]), np.array([1, 0, 1, 1]))
    # always 1: acc 3/4, precision 3/4, recall 1 -> f1 = 6/7
    assert m == {"accuracy": 0.75, "f1": pytest.approx(6 / 7)}
    assert majority_baseline("cola", [1, 1, 0], [1, 0]) == {"matthews_correlation": 0.0}
    assert majority_baseline("stsb", np.array([1.0, 2.0]), np.array([0.0, 5.0])) == {
        "pearson": 0.0, "spearmanr": 0.0}
