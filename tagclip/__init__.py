"""TagCLIP: training-free open-vocabulary multi-label classification with CLIP (the classification stage)."""
from toolkit.errors import InputError

from .method import TagCLIPOutput, TagCLIPParams, classify_batch
from .registry import DATASETS, DatasetConfig, get_dataset
from .tagger import Tagger

__all__ = ["InputError", "TagCLIPOutput", "TagCLIPParams", "classify_batch", "DATASETS", "DatasetConfig",
           "get_dataset", "Tagger"]
