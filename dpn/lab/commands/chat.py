"""``dpn chat``: talk to a model about an image."""

from __future__ import annotations

import argparse

from dpn.lab.commands.arguments import add_model, add_pyramid, require_model

NAME = "chat"


def add_to(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser(NAME, help="talk to a model about an image: answers with kept tokens, FLOPs, "
                                          "time to first token")
    add_model(chat)
    add_pyramid(chat)
    chat.add_argument("--image", help="image to talk about (in the loop: /image PATH)")
    chat.add_argument("--prompt", help="answer this one question and exit (default: read questions from stdin)")
    chat.add_argument("--max-new-tokens", type=int, default=128)
    chat.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.chat import run_chat

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    require_model(args.model)
    return run_chat(args.model, args.pyramid, args.image, args.prompt, args.max_new_tokens)
