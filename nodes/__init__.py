"""ComfyUI nodes of CustomContrast (V3 API); imported only by ComfyUI through ``comfy_entrypoint``."""
from comfy_api.latest import ComfyExtension, io

from .loader import CustomContrastLoader


class CustomContrastExtension(ComfyExtension):
    """Registers every CustomContrast node."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [CustomContrastLoader]
