"""The dedicated router token of DPN as released (arXiv 2503.20322; aihao2000/DPN-LLaVA).

The released training script adds a ``<ROUTER>`` token to the tokenizer and writes it after every
human turn; the routers read the mean of those tokens' hidden states
(``PyramidConfig(router_input="router_tokens_mean", router_token_id=...)``, or the ``released``
preset). These helpers do the model and prompt side for a stock Hugging Face model:

    token_id = dpn.router_token.add_router_token(model, tokenizer)
    config = dpn.presets.released(model, router_token_id=token_id)
    messages = dpn.router_token.insert_router_tokens(messages)   # before apply_chat_template
"""

from __future__ import annotations

from typing import Any

ROUTER_TOKEN = "<ROUTER>"
USER_ROLES = ("user", "human")


def add_router_token(model: Any, tokenizer: Any, token: str = ROUTER_TOKEN) -> int:
    """The id of ``token`` in ``tokenizer``, added as a special token (never split, kept by
    ``decode(skip_special_tokens=False)`` only) if it is not there yet; the model's input and output
    embeddings grow when the id does not fit them (new rows: the mean of the others). Call it
    before ``apply_pyramid``; save the tokenizer with the model."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id >= model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    return int(token_id)


def insert_router_tokens(messages: list[dict[str, Any]], token: str = ROUTER_TOKEN) -> list[dict[str, Any]]:
    """Chat messages with ``token`` at the end of every user turn (string contents, or content lists
    in the ``{"type": "text", ...}`` form); the input list is not changed."""
    result = []
    for message in messages:
        if message.get("role") in USER_ROLES:
            content = message.get("content")
            if isinstance(content, str):
                message = {**message, "content": content + token}
            elif isinstance(content, list):
                message = {**message, "content": [*content, {"type": "text", "text": token}]}
            else:
                raise ValueError(f"a user message's content must be a string or a list of parts, got {content!r}")
        result.append(message)
    return result


def router_token_text(config: Any, tokenizer: Any) -> str | None:
    """The router token a pyramid config reads, as text of ``tokenizer`` (None when it reads none);
    a ValueError when the tokenizer does not have that id."""
    if config is None or not config.reads_router_tokens:
        return None
    token = tokenizer.convert_ids_to_tokens(config.router_token_id)
    if token is None or config.router_token_id >= len(tokenizer):
        raise ValueError(f"the pyramid reads router token id {config.router_token_id}, which this tokenizer does not "
                         f"have ({len(tokenizer)} tokens); use the tokenizer saved with the pyramid")
    return token


__all__ = ["ROUTER_TOKEN", "add_router_token", "insert_router_tokens", "router_token_text"]
