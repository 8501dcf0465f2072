"""Subject masks for records without them: SAM prompted by a box, cached on disk."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from .manifest import SubjectRecord

log = logging.getLogger(__name__)


def default_box(width: int, height: int, margin: float = 0.05) -> tuple[int, int, int, int]:
    """The whole image minus a margin, as (x0, y0, x1, y1)."""
    return int(width * margin), int(height * margin), int(width * (1 - margin)), int(height * (1 - margin))


class SamMasker:
    """segment-anything from a local checkpoint, prompted with one box per image; results cached."""

    def __init__(self, checkpoint: str | Path | None, model_type: str = "vit_b", device: str = "cpu",
                 cache_dir: str | Path = ".cache/masks") -> None:
        from segment_anything import SamPredictor, sam_model_registry

        if checkpoint is not None and not Path(checkpoint).is_file():
            raise FileNotFoundError(f"SAM checkpoint not found at {checkpoint} (nothing is downloaded)")
        sam = sam_model_registry[model_type](checkpoint=None if checkpoint is None else str(checkpoint))
        self.predictor = SamPredictor(sam.to(device).eval())
        self.model_type = model_type
        self.cache_dir = Path(cache_dir)

    def _key(self, image_path: Path, box: tuple[int, int, int, int]) -> str:
        digest = hashlib.sha256(image_path.read_bytes())
        digest.update(f"{box}{self.model_type}".encode())
        return digest.hexdigest()[:32]

    def __call__(self, image_path: str | Path, box: tuple[int, int, int, int] | None = None) -> Path:
        """Returns the path of the cached binary mask PNG of the subject in ``box``."""
        image_path = Path(image_path)
        with Image.open(image_path) as img:
            rgb = np.asarray(img.convert("RGB"))
        box = box or default_box(rgb.shape[1], rgb.shape[0])
        out = self.cache_dir / f"{self._key(image_path, box)}.png"
        if out.is_file():
            return out
        self.predictor.set_image(rgb)
        masks, scores, _ = self.predictor.predict(box=np.array(box), multimask_output=False)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray((masks[int(np.argmax(scores))] * 255).astype(np.uint8)).save(out)
        return out


class GroundingDinoBoxes:
    """Boxes for a class word from a local GroundingDINO (transformers) folder."""

    def __init__(self, model_dir: str | Path, device: str = "cpu", threshold: float = 0.3) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"GroundingDINO folder not found at {model_dir} (nothing is downloaded)")
        self.processor = AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModelForZeroShotObjectDetection.from_pretrained(str(model_dir), local_files_only=True)
        self.model.to(device).eval()
        self.device, self.threshold = device, threshold

    def __call__(self, image_path: str | Path, word: str) -> tuple[int, int, int, int] | None:
        import torch

        with Image.open(image_path) as img:
            image = img.convert("RGB")
        inputs = self.processor(images=image, text=f"{word}.", return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = self.model(**inputs)
        result = self.processor.post_process_grounded_object_detection(
            outputs, inputs.input_ids, threshold=self.threshold, target_sizes=[image.size[::-1]])[0]
        if len(result["scores"]) == 0:
            return None
        best = int(result["scores"].argmax())
        return tuple(int(v) for v in result["boxes"][best].tolist())


def fill_masks(records: Sequence[SubjectRecord], masker: SamMasker,
               boxes: GroundingDinoBoxes | None = None) -> list[SubjectRecord]:
    """Adds SAM masks to every record that has none (box from GroundingDINO on the class word if given)."""
    out = []
    for record in records:
        if record.masks is not None:
            out.append(record)
            continue
        masks = []
        for image in record.images:
            box = boxes(image, record.cls) if boxes is not None else None
            masks.append(str(masker(image, box)))
        out.append(replace(record, masks=tuple(masks)))
        log.info("masked %d views of %s", len(masks), record.subject)
    return out
