"""The lab's engine: what the commands share to load, answer, decode and time models.

``answering`` (one answerer for chat, serve and the lmms-eval plugin), ``messages`` (one message
normaliser), ``decoding`` (decoding as ``generate`` positions it), ``pyramids`` (a ``--pyramid`` spec on a loaded model), ``checkpoints``, ``run_identity``,
``timing``, ``overhead`` and ``console``.
"""
