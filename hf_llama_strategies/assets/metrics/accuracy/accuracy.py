"""Accuracy, as an `evaluate` metric module shipped with the package.

`evaluate.load("accuracy")` needs the Hub; this module is loaded by path instead:
``evaluate.load(hf_llama_strategies.data.metrics.metric_path("accuracy"))``.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Accuracy: the proportion of predictions equal to their reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): true labels.
    normalize (bool): return the proportion (default) or the count of correct predictions.
    sample_weight (list of float): weights of the examples.
Returns:
    accuracy (float or int)
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int32"), "references": datasets.Value("int32")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        correct = (np.asarray(predictions) == np.asarray(references)).astype(np.float64)
        if sample_weight is not None:
            correct = correct * np.asarray(sample_weight, dtype=np.float64)
        total = float(correct.sum())
        if normalize:
            denominator = float(np.sum(sample_weight)) if sample_weight is not None else float(len(correct))
            return {"accuracy": total / denominator if denominator else 0.0}
        return {"accuracy": total}
