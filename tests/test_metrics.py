import numpy as np
import pytest

from jpeft.metrics import glue_metrics, majority_baseline


def test_matthews_on_known_confusion_matrix():
    # tp=3 tn=2 fp=1 fn=1 -> mcc = (6 - 1) / sqrt(4*4*3*3) = 5/12
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    preds = np.array([1, 1, 1, 0, 0, 0, 1])
    logits = np.stack([1 - preds, preds], axis=1).astype(float)
    assert glue_metrics("cola", logits, labels)["matthews_correlation"] == pytest.approx(5 / 12)


def test_accuracy_f1_keys_and_values():
    labels = np.array([1, 0, 1, 1])
    logits = np.array([[0, 1], [1, 0], [1, 0], [0, 1]], float)
    m = glue_metrics("mrpc", logits, labels)
    assert set(m) == {"accuracy", "f1"}
    assert m["accuracy"] == pytest.approx(0.75) and m["f1"] == pytest.approx(0.8)
    assert set(glue_metrics("sst2", logits, labels)) == {"accuracy"}


def test_regression_metrics():
    labels = np.array([0.0, 1.0, 2.0, 3.0])
    m = glue_metrics("stsb", np.array([[0.1], [0.9], [2.5], [2.4]]), labels)
    assert set(m) == {"pearson", "spearmanr"}
    assert m["spearmanr"] == pytest.approx(0.8)
    assert 0.9 < m["pearson"] < 1.0
    assert glue_metrics("stsb", np.ones(4), labels) == {"pearson": 0.0, "spearmanr": 0.0}


def test_majority_baseline():
    assert majority_baseline("sst2", np.array([1, 1, 0]), np.array([1, 0, 0, 0])) == {"accuracy": 0.25}
    assert majority_baseline("stsb", np.array([1.0, 2.0]), np.array([0.0, 5.0]))["pearson"] == 0.0
    with pytest.raises(ValueError):
        glue_metrics("sst2", np.zeros((3, 2)), np.zeros(4))
