"""ComfyUI entry point of CustomContrast; imports nothing heavy until ComfyUI asks for the nodes."""


async def comfy_entrypoint():
    """Returns the CustomContrast ComfyExtension (ComfyUI V3 node API)."""
    from .nodes.extension import CustomContrastExtension
    return CustomContrastExtension()
