"""Getting image bytes from a request: data URLs and http(s) URLs, with byte,
pixel and time limits. Only the header is checked here (the router stays
light); full decoding and preprocessing happen on the encode workers."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass

import aiohttp
from PIL import Image, UnidentifiedImageError

from ..messages import ImageSize
from .errors import bad_request

Image.MAX_IMAGE_PIXELS = None  # our own pixel limit applies, with a clear message


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    fetch_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.fetch_timeout <= 0:
            raise ValueError("image limits must be positive")


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    size: ImageSize


class ImageFetcher:
    def __init__(self, limits: ImageLimits, session: aiohttp.ClientSession) -> None:
        self.limits = limits
        self.session = session

    async def fetch(self, url: str, param: str) -> FetchedImage:
        if url.startswith("data:"):
            data = self._from_data_url(url, param)
        elif url.startswith(("http://", "https://")):
            data = await self._from_http(url, param)
        else:
            raise bad_request(f"unsupported image URL scheme in {url[:32]!r}: use a data: or http(s): URL",
                              "invalid_image_url", param)
        return FetchedImage(data, self._check(data, param))

    def _from_data_url(self, url: str, param: str):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request("image data URL must look like data:image/<type>;base64,<data>", "invalid_image_url",
                              param)
        if not header[5:].startswith("image/"):
            raise bad_request(f"data URL has media type {header[5:].split(';')[0]!r}, not an image",
                              "invalid_image", param)
        if len(payload) * 3 // 4 > self.limits.max_bytes:
            raise self._too_big(len(payload) * 3 // 4, param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise bad_request(f"image data URL is not valid base64: {exc}", "invalid_image", param) from exc

    async def _from_http(self, url: str, param: str) -> bytes:
        timeout = aiohttp.ClientTimeout(total=self.limits.fetch_timeout)
        try:
            async with self.session.get(url, timeout=timeout) as response:
                if response.status != 200:
                    raise bad_request(f"fetching image {url} returned HTTP {response.status}",
                                      "image_url_unreachable", param)
                if (response.content_length or 0) > self.limits.max_bytes:
                    raise self._too_big(response.content_length, param)
                data = bytearray()
                async for chunk in response.content.iter_chunked(1 << 16):
                    data += chunk
                    if len(data) > self.limits.max_bytes:
                        raise self._too_big(len(data), param)
                return bytes(data)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc) or type(exc).__name__
            raise bad_request(f"cannot fetch image {url}: {reason}", "image_url_unreachable", param) from exc

    def _check(self, data: bytes, param: str) -> ImageSize:
        if len(data) > self.limits.max_bytes:
            raise self._too_big(len(data), param)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise bad_request(f"image bytes are not a valid image: {exc}", "invalid_image", param) from exc
        if width * height > self.limits.max_pixels:
            raise bad_request(f"image of {width}x{height} pixels exceeds the limit of {self.limits.max_pixels} "
                              "pixels", "image_too_large", param)
        return ImageSize(width, height)

    def _too_big(self, size: int, param: str):
        return bad_request(f"image of {size} bytes exceeds the limit of {self.limits.max_bytes} bytes",
                           "image_too_large", param)
