"""ComfyUI nodes of CustomContrast (V3 API); ``docs/sampling-patch.md`` follows one sampler call through them."""
