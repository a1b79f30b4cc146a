"""``MediaNormalizer``: turns every media reference in a chat request into a checked ``data:`` URL.

Engines never fetch anything: http(s) images are fetched here (``SafeFetcher``), inline ones are
decoded and checked, local paths are refused unless ``local_media_dir`` allows them, and the parts
are reshaped for the target engine's dialect (``parts.py``). All media of one request resolve
concurrently (bounded by the fetcher), and the first failure cancels the rest.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp.abc import AbstractResolver

from gateway.media import failures
from gateway.media.cache import MediaCache, key_for_bytes, key_for_url
from gateway.media.datauri import (
    build_data_url,
    decode_base64,
    decode_head,
    decoded_size_bound,
    looks_like_base64,
    parse_data_url,
)
from gateway.media.fetch import Fetched, SafeFetcher
from gateway.media.images import image_data_url
from gateway.media.local import read_local_file
from gateway.media.parts import MediaJob, plan_messages
from gateway.media.parts import needs_work as _needs_work
from gateway.media.settings import MediaConfig
from gateway.media.sniff import SNIFF_BYTES, sniff_image, sniff_media
from gateway.media.urls import parse_http_url, reference_kind

log = logging.getLogger(__name__)
T = TypeVar("T")


async def _all_or_nothing(aws: list[Awaitable[T]]) -> list[T]:
    """Like ``gather``, but the first failure cancels (and waits for) the others: no fetch outlives it."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _decode_and_hash(payload: str, param: str | None) -> tuple[bytes, bool, str]:
    data, canonical = decode_base64(payload, param)
    return data, canonical, key_for_bytes(data)


class MediaNormalizer:
    """Build once in the app lifespan: ``await start()``, then ``normalize_chat`` per request, ``close()``."""

    def __init__(
        self,
        config: MediaConfig,
        *,
        resolver: AbstractResolver | None = None,
        fetcher: SafeFetcher | None = None,
    ) -> None:
        self.config = config
        self.fetcher = fetcher or SafeFetcher(config, resolver=resolver)
        self.cache = MediaCache(config.cache_entries, config.cache_max_bytes)

    async def start(self) -> None:
        await self.fetcher.start()

    async def close(self) -> None:
        await self.fetcher.close()
        self.cache.clear()

    async def __aenter__(self) -> MediaNormalizer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def needs_work(body: dict[str, Any]) -> bool:
        """Cheap, for every chat request: True only if some message has a non-text content part."""
        return _needs_work(body)

    async def normalize_chat(self, body: dict[str, Any], dialect: str) -> None:
        """Rewrite ``body["messages"]`` in place for ``dialect``; ``BadRequest``/``MediaError`` on refusal."""
        jobs = plan_messages(body.get("messages"), dialect)
        if not jobs:
            return
        limit = self.config.max_images_per_request
        if len(jobs) > limit:
            raise failures.too_many(len(jobs), limit)
        groups: dict[tuple[str, str], list[MediaJob]] = {}
        for job in jobs:  # the same image sent twice in one request is resolved once
            groups.setdefault((job.kind, job.source), []).append(job)
        results = await _all_or_nothing([self._resolve(group[0]) for group in groups.values()])
        for group, result in zip(groups.values(), results, strict=True):
            for job in group:
                job.target[job.key] = result

    async def _fetch_cached(self, ref: str, param: str | None, convert: Callable[[Fetched], str]) -> str:
        """Fetch an http(s) reference once per cache lifetime; ``convert`` (run in a thread) makes the data URL."""
        url = parse_http_url(ref, self.config.allowed_domains, param)
        key = key_for_url(str(url))
        if (hit := self.cache.get(key)) is not None:
            return hit
        fetched = await self.fetcher.fetch(url, param=param)
        result = await asyncio.to_thread(convert, fetched)
        self.cache.put(key, result, ttl=self.config.url_cache_ttl)
        return result

    async def resolve_image(self, ref: str, *, param: str | None = None) -> str:
        """Any image reference (http(s), data:, raw base64, allowed local path) → checked data URL."""
        kind = reference_kind(ref)
        if kind == "http":
            return await self._fetch_cached(
                ref, param, lambda fetched: image_data_url(fetched.data, self.config, param)
            )
        if kind == "data":
            return await self._inline_image(parse_data_url(ref, param).payload, param)
        if kind == "other" and looks_like_base64(ref) and sniff_image(decode_head(ref)) is not None:
            return await self._inline_image(ref, param)
        if kind in ("file", "other"):
            data = await self._read_local(ref, param)
            return await self.load_image_bytes(data, param=param)
        raise failures.forbidden(param)

    async def load_image_bytes(self, data: bytes, *, param: str | None = None) -> str:
        """Uploaded bytes (``/infer/upload``, multipart) → checked ``data:`` URL with the sniffed MIME."""
        if len(data) > self.config.max_image_bytes:
            raise failures.too_large_bytes(self.config.max_image_bytes, param)
        key = await asyncio.to_thread(key_for_bytes, data)
        if (hit := self.cache.get(key)) is not None:
            return hit
        result = await asyncio.to_thread(image_data_url, data, self.config, param)
        self.cache.put(key, result)
        return result

    async def _resolve(self, job: MediaJob) -> str:
        if job.kind == "image":
            return await self.resolve_image(job.source, param=job.param)
        if job.kind == "input_audio":
            await self._check_base64(job.source, job.param)
            return job.source
        return await self._resolve_av(job.source, job.param)

    async def _inline_image(self, payload: str, param: str | None) -> str:
        self._precheck_size(payload, param)
        data, canonical, key = await asyncio.to_thread(_decode_and_hash, payload, param)
        if (hit := self.cache.get(key)) is not None:
            return hit
        result = await asyncio.to_thread(
            image_data_url, data, self.config, param, payload=payload if canonical else None
        )
        self.cache.put(key, result)
        return result

    async def _resolve_av(self, ref: str, param: str) -> str:
        """Audio/video for engines that take it (vLLM): data: URLs kept, http(s) inlined, no decoding."""
        kind = reference_kind(ref)
        if kind == "data":
            parsed = parse_data_url(ref, param)
            # vLLM also takes data:video/jpeg;base64,<frame>,<frame>,... (each frame checked, and counted)
            chunks = parsed.payload.split(",") if parsed.mime == "video/jpeg" else [parsed.payload]
            if len(chunks) > self.config.max_frames:
                raise failures.too_many_frames(self.config.max_frames, param)
            self._precheck_size(parsed.payload, param)
            for chunk in chunks:
                await self._check_base64(chunk, param)
            return ref
        if kind == "http":
            return await self._fetch_cached(
                ref, param, lambda fetched: self._media_data_url(fetched.data, fetched.content_type, param)
            )
        if kind in ("file", "other"):
            data = await self._read_local(ref, param)
            return await asyncio.to_thread(self._media_data_url, data, None, param)
        raise failures.forbidden(param, "media URL")

    def _media_data_url(self, data: bytes, content_type: str | None, param: str | None) -> str:
        mime = sniff_media(data[:SNIFF_BYTES])
        if mime is None and content_type:
            claimed = content_type.split(";")[0].strip().lower()
            if claimed.startswith(("audio/", "video/")) and claimed.replace("/", "").replace("-", "").isalnum():
                mime = claimed
        if mime is None:
            raise failures.unsupported_content("this audio/video format", param)
        return build_data_url(mime, data)

    async def _check_base64(self, payload: str, param: str | None) -> None:
        self._precheck_size(payload, param)
        data, _canonical = await asyncio.to_thread(decode_base64, payload, param)
        if len(data) > self.config.max_image_bytes:
            raise failures.too_large_bytes(self.config.max_image_bytes, param)

    def _precheck_size(self, payload: str, param: str | None) -> None:
        """Refuse before decoding (a little slack for line breaks in the base64)."""
        if decoded_size_bound(payload) > self.config.max_image_bytes * 1.05 + 1024:
            raise failures.too_large_bytes(self.config.max_image_bytes, param)

    async def _read_local(self, ref: str, param: str | None) -> bytes:
        return await asyncio.to_thread(
            read_local_file, ref, self.config.local_media_dir, self.config.max_image_bytes, param
        )
