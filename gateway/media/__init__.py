"""Media for chat requests: fetch, check and inline images (and vLLM's audio/video) as ``data:`` URLs.

Modules, one concept each::

    config     MediaConfig (the ``media:`` config section)
    failures   the MediaError refusals and their codes
    urls       parsing references with yarl (the parser aiohttp connects with)
    ssrf       address policy + GuardedResolver (check the addresses actually connected to)
    fetch      SafeFetcher (own aiohttp session, manual redirects, byte cap, deadline)
    sniff      magic numbers
    images     header-only image checks, data: URLs
    datauri    data: URLs and base64
    local      reading inside local_media_dir only
    cache      LRU of checked data: URLs
    parts      reshaping content parts per engine dialect (pure)
    normalize  MediaNormalizer, what the request path calls
"""

from gateway.media.fetch import SafeFetcher
from gateway.media.normalize import MediaNormalizer
from gateway.media.settings import MediaConfig

__all__ = ["MediaConfig", "MediaNormalizer", "SafeFetcher"]
