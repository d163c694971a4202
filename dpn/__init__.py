"""dpn: Dynamic Pyramid Networks for Hugging Face multimodal LLMs (arXiv 2503.20322).

The library needs torch, transformers and safetensors only; the tools around it (training,
evaluation, benchmarks, the demo, the ``dpn`` command) are in ``dpn.lab``.
"""

from dpn import flops, presets, router_token
from dpn.api import (
    apply_pyramid,
    get_pyramid,
    get_pyramid_config,
    has_pyramid,
    load_pyramid,
    load_pyramid_weights,
    pyramid_disabled,
    remove_pyramid,
    save_pyramid,
)
from dpn.budget import (
    calibrate_router_bias,
    get_router_bias,
    probability_scale,
    router_bias,
    set_probability_scale,
    set_router_bias,
)
from dpn.config import PyramidConfig
from dpn.geometry import ModelGeometry
from dpn.models import geometry_of, register_adapter
from dpn.outputs import PyramidCausalLMOutput, PyramidRouting
from dpn.runtime import PyramidCache
from dpn.strategies import (
    CDPrunerConfig,
    DivPruneConfig,
    DPNConfig,
    FastVConfig,
    PDropConfig,
    PoolingStage,
    ProjectorConfig,
    RandomConfig,
    SelectionStage,
    SparseVLMConfig,
    StaticConfig,
    VisionZipConfig,
    VisPrunerConfig,
    register_spec,
    register_strategy,
)

__version__ = "0.2.0"

__all__ = [
    "CDPrunerConfig",
    "DivPruneConfig",
    "DPNConfig",
    "FastVConfig",
    "ModelGeometry",
    "PDropConfig",
    "PoolingStage",
    "ProjectorConfig",
    "PyramidCache",
    "PyramidCausalLMOutput",
    "PyramidConfig",
    "PyramidRouting",
    "RandomConfig",
    "SelectionStage",
    "SparseVLMConfig",
    "StaticConfig",
    "VisionZipConfig",
    "VisPrunerConfig",
    "apply_pyramid",
    "calibrate_router_bias",
    "flops",
    "geometry_of",
    "get_pyramid",
    "get_pyramid_config",
    "get_router_bias",
    "has_pyramid",
    "load_pyramid",
    "load_pyramid_weights",
    "presets",
    "probability_scale",
    "pyramid_disabled",
    "register_adapter",
    "register_spec",
    "register_strategy",
    "remove_pyramid",
    "router_bias",
    "router_token",
    "save_pyramid",
    "set_probability_scale",
    "set_router_bias",
]
