"""TagCLIP: training-free open-vocabulary multi-label tagging with CLIP (AAAI 2024)."""
from .errors import InputError
from .method import TagCLIPOutput, TagCLIPParams, classify_batch
from .registry import DATASETS, DatasetConfig, get_dataset
from .tagger import Tagger

__all__ = ["InputError", "TagCLIPOutput", "TagCLIPParams", "classify_batch", "DATASETS",
           "DatasetConfig", "get_dataset", "Tagger"]
