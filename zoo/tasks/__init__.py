"""Lightning task logic shared by the families (loss, metrics, optimisation, decoding)."""

from zoo.tasks.classification import ImageClassifier
from zoo.tasks.translation import TranslationTask

__all__ = ["ImageClassifier", "TranslationTask"]
