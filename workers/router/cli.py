"""`epd router`: the OpenAI-compatible HTTP front end."""

from __future__ import annotations

import argparse
import logging
import sys

from aiohttp import web

from ..models import UnknownModelError, load_adapter
from .app import Router, RouterConfig
from .images import ImageLimits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava", help="preset name, local model directory or hub id")
    parser.add_argument("--served-model-name", default="", help="model name clients use (default: --model)")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-images-per-request", type=int, default=8)
    parser.add_argument("--max-image-bytes", type=int, default=ImageLimits.max_bytes)
    parser.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels)
    parser.add_argument("--image-fetch-timeout", type=float, default=ImageLimits.fetch_timeout)
    parser.add_argument("--default-max-tokens", type=int, default=256)
    parser.add_argument("--prefix-block-size", type=int, default=16,
                        help="prefill workers' prefix-cache block size (prefix-affinity routing)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        limits = ImageLimits(args.max_image_bytes, args.max_image_pixels, args.image_fetch_timeout)
        config = RouterConfig(model=args.model, redis_url=args.redis_url, served_model_name=args.served_model_name,
                              max_images_per_request=args.max_images_per_request,
                              default_max_tokens=args.default_max_tokens, limits=limits,
                              prefix_block_size=args.prefix_block_size)
        adapter = load_adapter(args.model)
    except (UnknownModelError, ValueError) as exc:
        print(f"epd router: {exc}", file=sys.stderr)
        return 2
    app = Router(config, adapter).app()
    print(f"EPD_ROUTER_READY http://{args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, handle_signals=True)
    return 0
