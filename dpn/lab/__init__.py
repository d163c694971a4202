"""The lab around the library: training, evaluation, comparison, benchmarks, the demo, the tiny
reference model, datasets and the ``dpn`` command line.

The library (``dpn``) needs only torch, transformers and safetensors; the lab also needs the
``lab`` extra (``pip install "dpn[lab]"``: rich, matplotlib, accelerate, pillow).
"""
