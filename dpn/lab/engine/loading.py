"""The lab's one loader: a saved model, its processor, and the pyramid to run it with."""

from __future__ import annotations

from pathlib import Path

from dpn.api import apply_pyramid, load_pyramid
from dpn.config import CONFIG_NAME
from dpn.lab.engine.pyramids import pyramid_from_spec
from dpn.lab.families import zoo


def load_model(model_dir: str, pyramid: str = "saved"):
    """Model (in eval mode) and processor from ``model_dir``, with ``pyramid``: ``saved`` (the one
    saved beside the model, if any), ``none``, or any ``--pyramid`` spec or config file."""
    model, processor = zoo.load(model_dir)
    model.eval()
    if pyramid == "saved":
        if (Path(model_dir) / CONFIG_NAME).is_file():
            load_pyramid(model, model_dir)
    else:
        config = pyramid_from_spec(pyramid, model, processor.tokenizer)
        if config is not None:
            apply_pyramid(model, config)
    return model, processor
