"""dpn: Dynamic Pyramid Networks for Hugging Face multimodal LLMs (arXiv 2503.20322)."""

from dpn.api import (
    apply_pyramid,
    get_pyramid_config,
    has_pyramid,
    load_pyramid,
    load_pyramid_weights,
    remove_pyramid,
    save_pyramid,
    set_probability_scale,
    set_router_bias,
)
from dpn.budget import calibrate_router_bias
from dpn.cache import PyramidCache
from dpn.config import PyramidConfig, PyramidStage
from dpn.outputs import PyramidCausalLMOutput, PyramidRouting
from dpn import flops

__version__ = "0.1.0"

__all__ = [
    "PyramidCache",
    "PyramidCausalLMOutput",
    "PyramidConfig",
    "PyramidRouting",
    "PyramidStage",
    "apply_pyramid",
    "calibrate_router_bias",
    "flops",
    "get_pyramid_config",
    "has_pyramid",
    "load_pyramid",
    "load_pyramid_weights",
    "remove_pyramid",
    "save_pyramid",
    "set_probability_scale",
    "set_router_bias",
]
