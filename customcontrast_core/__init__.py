"""Pure-PyTorch core of CustomContrast: configs, MFI-Encoder, attention math, masks, prompts, checkpoints."""
from .config import PRESETS, EncoderConfig, get_preset
from .encoder import ImageFeatures, MFIEncoder, SubjectEncoding, timestep_fourier_features
from .layers import CrossAttentionLayer, UNetStructure, cross_attention_layers, layer_table
from .perceiver import FeedForward, PerceiverAttention, QFormer, QFormerBlock
from .visual_kv import CustomContrastModel, KVProjection, VisualKV
from .checkpoint import CheckpointError, CheckpointInfo
from .attention import SubjectBranch, SubjectMaps, customcontrast_attention, plain_attention
from .masks import MaskConfig, combine_maps, make_mask, minmax_normalize, resize_mask
from .prompt import PlaceholderError, assemble_splus, check_prompt, collapse_placeholders, placeholder_words

__all__ = [
    "PRESETS", "EncoderConfig", "get_preset",
    "ImageFeatures", "MFIEncoder", "SubjectEncoding", "timestep_fourier_features",
    "CrossAttentionLayer", "UNetStructure", "cross_attention_layers", "layer_table",
    "FeedForward", "PerceiverAttention", "QFormer", "QFormerBlock",
    "CustomContrastModel", "KVProjection", "VisualKV", "CheckpointError", "CheckpointInfo",
    "SubjectBranch", "SubjectMaps", "customcontrast_attention", "plain_attention",
    "MaskConfig", "combine_maps", "make_mask", "minmax_normalize", "resize_mask",
    "PlaceholderError", "assemble_splus", "check_prompt", "collapse_placeholders", "placeholder_words",
]
