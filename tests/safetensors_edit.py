"""Rewrites a .safetensors file with changed tensors or metadata (to build damaged or outdated files)."""
from safetensors.torch import load_file, save_file


def rewrite(path, tensors=None, **meta_changes):
    """Keeps the file's tensors unless ``tensors`` is given; a metadata value of None removes that key."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(path)) if tensors is None else tensors
    meta.update(meta_changes)
    save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})
