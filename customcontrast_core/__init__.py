"""Pure-PyTorch core of CustomContrast: configs, MFI-Encoder, attention math, masks, prompts, checkpoints."""
from .config import PRESETS, EncoderConfig, get_preset
from .encoder import ImageFeatures, MFIEncoder, SubjectEncoding, timestep_fourier_features
from .layers import CrossAttentionLayer, UNetStructure, cross_attention_layers, layer_table
from .perceiver import FeedForward, PerceiverAttention, QFormer, QFormerBlock
from .visual_kv import CustomContrastModel, KVProjection, VisualKV
from .checkpoint import CheckpointError, CheckpointInfo

__all__ = [
    "PRESETS", "EncoderConfig", "get_preset",
    "ImageFeatures", "MFIEncoder", "SubjectEncoding", "timestep_fourier_features",
    "CrossAttentionLayer", "UNetStructure", "cross_attention_layers", "layer_table",
    "FeedForward", "PerceiverAttention", "QFormer", "QFormerBlock",
    "CustomContrastModel", "KVProjection", "VisualKV", "CheckpointError", "CheckpointInfo",
]
