"""`epd router`: the OpenAI-compatible HTTP front end."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..models import UnknownModelError, load_adapter
from ..redis_connection import add_redis_argument, redis_url
from ..security.api_keys import add_api_key_arguments, api_keys_from
from ..security.tls import add_tls_arguments, tls_from_args
from ..security.url_guard import URLPolicy, parse_allow_hosts
from .app import Router, RouterConfig
from .image_cost import ImageLimits
from .request_body import RequestLimits
from .server import serve

DEFAULT_METRICS_PORT = 9100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny-llava", help="preset name, local model directory or hub id")
    parser.add_argument("--served-model-name", default="", help="model name clients use (default: --model)")
    add_redis_argument(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                        help="Prometheus /metrics port, apart from the public one (0 = any free port)")
    limits = parser.add_argument_group("input limits")
    limits.add_argument("--max-images-per-request", type=int, default=8)
    image = ImageLimits()
    limits.add_argument("--max-image-bytes", type=int, default=image.max_bytes)
    limits.add_argument("--max-image-pixels", type=int, default=image.max_pixels, help="decoded width x height")
    limits.add_argument("--max-image-aspect-ratio", type=float, default=image.max_aspect_ratio,
                        help="long side / short side")
    limits.add_argument("--max-processed-image-pixels", type=int, default=image.max_processed_pixels,
                        help="pixels the model's image processor makes of an image")
    limits.add_argument("--max-image-tokens", type=int, default=image.max_image_tokens,
                        help="image tokens one image may become (0 = the model's context length)")
    limits.add_argument("--image-fetch-timeout", type=float, default=image.fetch_timeout)
    body = RequestLimits()
    limits.add_argument("--max-body-bytes", type=int, default=body.max_body_bytes)
    limits.add_argument("--header-timeout", type=float, default=body.header_timeout,
                        help="seconds a connection has to send a complete request head, from its opening or "
                             "its previous response (also the idle keep-alive timeout)")
    limits.add_argument("--body-timeout", type=float, default=body.body_timeout,
                        help="seconds to receive a request body")
    limits.add_argument("--default-max-tokens", type=int, default=256)
    limits.add_argument("--allow-special-tokens-in-text", action="store_true",
                        help="let control-token strings typed in message text (e.g. </s>) act as control tokens; "
                             "by default they are plain text")
    security = parser.add_argument_group("access")
    add_api_key_arguments(security)
    security.add_argument("--allow-private-image-urls", action="store_true",
                          help="let image URLs reach loopback, private, link-local and metadata addresses")
    security.add_argument("--image-url-allow-host", action="append", default=[], metavar="HOST",
                          help="fetch image URLs only from this host or *.domain (repeatable)")
    add_tls_arguments(parser)
    parser.add_argument("--max-recoveries", type=int, default=3,
                        help="times one request is retried or resumed after losing a worker")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        limits = ImageLimits(args.max_image_bytes, args.max_image_pixels, args.image_fetch_timeout,
                             args.max_image_aspect_ratio, args.max_processed_image_pixels, args.max_image_tokens)
        request_limits = RequestLimits(args.max_body_bytes, args.header_timeout, args.body_timeout)
        config = RouterConfig(model=args.model, redis_url=redis_url(args.redis_url),
                              served_model_name=args.served_model_name,
                              max_images_per_request=args.max_images_per_request,
                              default_max_tokens=args.default_max_tokens, limits=limits,
                              request_limits=request_limits,
                              api_keys=api_keys_from(args.api_key, args.api_key_file),
                              url_policy=URLPolicy(args.allow_private_image_urls,
                                                   parse_allow_hosts(args.image_url_allow_host)),
                              tls=tls_from_args(args), special_tokens_in_text=args.allow_special_tokens_in_text,
                              max_recoveries=args.max_recoveries)
        adapter = load_adapter(args.model)
    except (UnknownModelError, ValueError) as exc:
        print(f"epd router: {exc}", file=sys.stderr)
        return 2
    router = Router(config, adapter)
    if not config.api_keys.required:
        logging.getLogger(__name__).warning("no API key configured: the router answers anyone who reaches it")
    asyncio.run(serve(router.app(), router.metrics_app(), args.host, args.port, args.metrics_port, request_limits))
    return 0
