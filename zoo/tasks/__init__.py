"""Lightning task logic shared by the families (loss, metrics, optimisation)."""

from zoo.tasks.classification import ImageClassifier

__all__ = ["ImageClassifier"]
