"""The ComfyUI extension: registers every CustomContrast node (V3 API)."""
from comfy_api.latest import ComfyExtension, io

from .apply_node import CustomContrastApply
from .loader import CustomContrastLoader
from .preview import CustomContrastMaskPreview
from .saved_subject import CustomContrastLoadSubject, CustomContrastSaveSubject
from .subject import CustomContrastEncodeSubject

NODES = [CustomContrastLoader, CustomContrastEncodeSubject, CustomContrastApply, CustomContrastMaskPreview,
         CustomContrastSaveSubject, CustomContrastLoadSubject]


class CustomContrastExtension(ComfyExtension):
    """Registers every CustomContrast node."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
