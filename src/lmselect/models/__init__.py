"""Model presets and Hugging Face builders."""
from lmselect.models.presets import PRESETS, Preset, build_model, count_params, flops_per_token, get_preset, hf_config

__all__ = ["PRESETS", "Preset", "build_model", "count_params", "flops_per_token", "get_preset", "hf_config"]
