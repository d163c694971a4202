"""``dpn serve``: an OpenAI-compatible chat server."""

from __future__ import annotations

import argparse

from dpn.lab import serve as defaults
from dpn.lab.commands.arguments import add_model, add_pyramid, require_model

NAME = "serve"


def add_to(commands: argparse._SubParsersAction) -> None:
    server = commands.add_parser(NAME, help="an OpenAI-compatible chat server; concurrent requests share batches")
    add_model(server)
    add_pyramid(server, saved="saved")
    server.add_argument("--host", default=defaults.DEFAULT_HOST, help="address to listen on (default: loopback only)")
    server.add_argument("--port", type=int, default=defaults.DEFAULT_PORT)
    server.add_argument("--name", help="the model id clients ask for (default: the model directory's name)")
    server.add_argument("--image-folder", help="allow local image paths inside this folder (default: data URLs only)")
    server.add_argument("--batch-window-ms", type=float, default=defaults.DEFAULT_BATCH_WINDOW_MS,
                        help="how long a request waits for others to share its batch")
    server.add_argument("--max-batch-size", type=int, default=defaults.DEFAULT_MAX_BATCH_SIZE)
    server.add_argument("--max-queue", type=int, default=defaults.DEFAULT_MAX_QUEUE,
                        help="waiting requests beyond this are answered 503")
    server.add_argument("--max-images", type=int, default=defaults.DEFAULT_MAX_IMAGES, help="per request")
    server.add_argument("--max-tokens", type=int, default=defaults.DEFAULT_MAX_TOKENS,
                        help="new tokens when a request does not say")
    server.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dpn.lab.serve import ServeOptions, serve

    require_model(args.model)
    serve(ServeOptions(
        model=args.model, pyramid=args.pyramid, host=args.host, port=args.port, name=args.name,
        image_folder=args.image_folder, batch_window_ms=args.batch_window_ms, max_batch_size=args.max_batch_size,
        max_queue=args.max_queue, max_images=args.max_images, default_max_tokens=args.max_tokens,
    ))
    return 0
