"""Training data: the subject manifest, builders, procedural subjects, masks and samples."""
from .batches import EpochBatches, global_batches
from .dataset import DataConfig, SubjectDataset, load_view
from .manifest import SubjectRecord, read_manifest, write_manifest
from .synthetic import generate_synthetic

__all__ = ["DataConfig", "EpochBatches", "SubjectDataset", "SubjectRecord", "generate_synthetic", "global_batches",
           "load_view", "read_manifest", "write_manifest"]
from .builders import from_mvimgnet, from_openimages_csv, from_subject_folders, read_dreambench_classes  # noqa: E402
from .masks import GroundingDinoBoxes, SamMasker, fill_masks  # noqa: E402

__all__ += ["GroundingDinoBoxes", "SamMasker", "fill_masks", "from_mvimgnet", "from_openimages_csv",
            "from_subject_folders", "read_dreambench_classes"]
