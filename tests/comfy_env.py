"""Loads a real ComfyUI (from COMFYUI_PATH) in process, on the CPU, with this extension registered.

Tests that need it call ``comfyui()``; without COMFYUI_PATH they are skipped with the reason.
"""
from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import types
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_REASON = ("COMFYUI_PATH is not set: real-ComfyUI tests need a ComfyUI checkout "
               "(see docs/testing.md)")
PACKAGE = "comfyui-customcontrast"
_LOADED: types.SimpleNamespace | None = None


def comfyui() -> types.SimpleNamespace:
    """Imports ComfyUI once per process and registers the extension's nodes; skips without COMFYUI_PATH."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip(SKIP_REASON)
    root = str(Path(root).resolve())
    if not Path(root, "comfy").is_dir():
        pytest.fail(f"COMFYUI_PATH={root} is not a ComfyUI checkout (no comfy/ folder)")
    sys.path.insert(0, root)
    os.chdir(root)
    import comfy.options
    comfy.options.enable_args_parsing(False) if hasattr(comfy.options, "enable_args_parsing") else None
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    import folder_paths
    import execution
    import nodes

    custom = Path(tempfile.mkdtemp(prefix="cc_custom_nodes_"))
    (custom / PACKAGE).symlink_to(REPO)
    if ipadapter_plus_path():   # loaded beside this extension, as a user installs it
        (custom / "ComfyUI_IPAdapter_plus").symlink_to(ipadapter_plus_path(), target_is_directory=True)
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom)], set())
    models = Path(tempfile.mkdtemp(prefix="cc_models_"))
    for name in ("customcontrast", "checkpoints", "clip_vision"):
        (models / name).mkdir()
        folder_paths.add_model_folder_path(name, str(models / name), is_default=True)
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    _LOADED = types.SimpleNamespace(root=Path(root), nodes=nodes, execution=execution, folder_paths=folder_paths,
                                    mm=mm, models=models, input_dir=Path(folder_paths.get_input_directory()))
    return _LOADED


def ipadapter_plus_path() -> Path | None:
    """The ComfyUI_IPAdapter_plus folder named by IPADAPTER_PLUS_PATH, or None."""
    path = os.environ.get("IPADAPTER_PLUS_PATH")
    return Path(path).resolve() if path and Path(path, "IPAdapterPlus.py").is_file() else None


class _Server:
    """The minimum of ComfyUI's server that PromptExecutor talks to."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))


def run_prompt(prompt: dict) -> tuple[bool, dict, list]:
    """Validates and executes an API-format workflow in process; returns (success, outputs, messages)."""
    env = comfyui()
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(env.execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        return False, {"validation": valid[1], "node_errors": valid[3]}, []
    global _EXECUTOR
    if _EXECUTOR is None:   # one executor: its cache keeps the loaded checkpoint between prompts
        _EXECUTOR = env.execution.PromptExecutor(_Server(), cache_type=env.execution.CacheType.CLASSIC,
                                                 cache_args={"lru": 0, "ram": 0})
    _EXECUTOR.execute(prompt, prompt_id, {}, valid[2])
    return _EXECUTOR.success, _EXECUTOR.history_result.get("outputs", {}), _EXECUTOR.status_messages


_EXECUTOR = None


# Random-weight, full-size model files (generated once, cached outside the repository)

CACHE = Path(os.environ.get("CUSTOMCONTRAST_TEST_CACHE", Path.home() / ".cache" / "customcontrast-tests"))
SD15_FILE = "sd15_random.safetensors"
CLIP_VISION_FILE = "clip_vision_vitl_random.safetensors"
CUSTOMCONTRAST_FILE = "customcontrast_sd15_test.safetensors"


def _save_text_encoder(model, path: Path) -> None:
    from safetensors.torch import save_file
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v.contiguous()
             for k, v in model.state_dict().items()}   # transformers 5 drops the prefix ComfyUI needs
    save_file(state, str(path))


def _make_sd15(path: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    env = comfyui()
    import comfy.diffusers_load
    import comfy.sd

    torch.manual_seed(0)
    folder = Path(tempfile.mkdtemp(prefix="cc_sd15_diffusers_"))
    for sub in ("unet", "vae", "text_encoder"):
        (folder / sub).mkdir()
    UNet2DConditionModel(cross_attention_dim=768, sample_size=64).save_pretrained(folder / "unet")
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                  sample_size=512).save_pretrained(folder / "vae")
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
    _save_text_encoder(text, folder / "text_encoder" / "model.safetensors")
    unet, clip, vae = comfy.diffusers_load.load_diffusers(str(folder))
    comfy.sd.save_checkpoint(str(path), unet, clip, vae)
    assert env is not None


def _make_clip_vision(path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(1)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                                           num_hidden_layers=24, num_attention_heads=16,
                                                           image_size=224, patch_size=14, projection_dim=768,
                                                           hidden_act="quick_gelu"))
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    state = {(k if k.startswith(("vision_model.", "visual_projection")) else f"vision_model.{k}"): v
             for k, v in state.items()}
    save_file(state, str(path))


def customcontrast_test_config():
    """An SD1.5 checkpoint config for a ViT-L/14 CLIP-vision model, small encoder widths."""
    import dataclasses

    from customcontrast_core.config import get_preset
    return dataclasses.replace(get_preset("sd15"), clip_width=1024, clip_num_layers=24, clip_layers=(8, 16, 24),
                               width=64, heads=4, dim_head=16, depth=2, fourier_dim=32, cls_dim=32)


def model_files() -> dict[str, str]:
    """Generates (once) and registers the random SD1.5, CLIP-vision and CustomContrast files."""
    env = comfyui()
    import torch

    from customcontrast_core import checkpoint
    from customcontrast_core.visual_kv import CustomContrastModel

    CACHE.mkdir(parents=True, exist_ok=True)
    if not (CACHE / SD15_FILE).exists():
        _make_sd15(CACHE / SD15_FILE)
    if not (CACHE / CLIP_VISION_FILE).exists():
        _make_clip_vision(CACHE / CLIP_VISION_FILE)
    torch.manual_seed(2)
    model = CustomContrastModel(customcontrast_test_config())
    with torch.no_grad():
        for proj in model.visual_kv.values():
            proj.to_k.weight.mul_(20)   # make the visual branch's effect large enough to see
            proj.to_v.weight.mul_(20)
    checkpoint.save(env.models / "customcontrast" / CUSTOMCONTRAST_FILE, model)
    for name, folder in ((SD15_FILE, "checkpoints"), (CLIP_VISION_FILE, "clip_vision")):
        link = env.models / folder / name
        if not link.exists():
            link.symlink_to(CACHE / name)
    env.folder_paths.filename_list_cache.clear() if hasattr(env.folder_paths, "filename_list_cache") else None
    return {"checkpoint": SD15_FILE, "clip_vision": CLIP_VISION_FILE, "customcontrast": CUSTOMCONTRAST_FILE}


# Random full-size SD1.5 / SDXL CLIPs (the UNet configs ComfyUI detects them from)

def unet_config(family: str, dtype: torch.dtype) -> dict:
    common = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                  dtype=dtype, in_channels=4, model_channels=320, use_temporal_attention=False,
                  use_temporal_resblock=False)
    if family == "sd15":
        return dict(common, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                    channel_mult=[1, 2, 4, 4], transformer_depth_middle=1, use_linear_in_transformer=False,
                    context_dim=768, num_heads=8, transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    return dict(common, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
                transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4], transformer_depth_middle=10,
                use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10])


def randomize_(module: "torch.nn.Module", seed: int = 0, std: float = 0.02) -> "torch.nn.Module":
    """Random weights for a model built without initialisation: normal(0, std) matrices, unit scales, zero biases."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, std)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return module
