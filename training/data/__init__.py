"""Training data: the subject manifest, builders, procedural subjects, masks and samples."""
from .dataset import DataConfig, SubjectDataset, load_view
from .manifest import SubjectRecord, read_manifest, write_manifest
from .synthetic import generate_synthetic

__all__ = ["DataConfig", "SubjectDataset", "SubjectRecord", "generate_synthetic", "load_view", "read_manifest",
           "write_manifest"]
