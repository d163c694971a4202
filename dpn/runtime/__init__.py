"""The pyramid runtime, in small parts:

- ``forward``: ``PyramidForward`` / ``pyramid_forward``, the orchestration of one call;
- ``inputs``: the call's arguments sorted and checked, validity, query tokens, forced experts;
- ``layout``: the ``BatchLayout`` carried between segments and ``shrink``;
- ``segments``: masks, rotary embeddings, length groups, running a segment's layers;
- ``record``: what the call did (``PyramidRouting``);
- ``cache``: ``PyramidCache``, the per-segment KV-cache bookkeeping.

The runtime knows no strategy's types and no model family: strategies plan, adapters prepare.
"""

from dpn.runtime.cache import PyramidCache
from dpn.runtime.forward import PyramidForward, pyramid_forward
from dpn.runtime.layout import BatchLayout, shrink
from dpn.runtime.segments import length_groups

__all__ = ["BatchLayout", "PyramidCache", "PyramidForward", "length_groups", "pyramid_forward", "shrink"]
