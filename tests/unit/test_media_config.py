"""MediaConfig parsing, the LRU cache, and the address/URL checks (no network)."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from gateway.http.errors import MediaError
from gateway.media.cache import MediaCache, key_for_bytes, key_for_url
from gateway.media.settings import MediaConfig, parse_bytes, parse_count
from gateway.media.ssrf import AddressPolicy, BlockedAddress, classify, looks_numeric
from gateway.media.urls import parse_http_url, redirect_target, reference_kind


@pytest.mark.parametrize(
    ("text", "value"),
    [("20MB", 20_000_000), ("512KiB", 524_288), ("1.5 GiB", 1_610_612_736), (1000, 1000), ("10_000", 10_000)],
)
def test_byte_sizes(text: object, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize(("text", "value"), [("40M", 40_000_000), ("40MP", 40_000_000), ("2.5k", 2500), (7, 7)])
def test_counts(text: object, value: int) -> None:
    assert parse_count(text) == value


@pytest.mark.parametrize("bad", ["-1MB", "0", "20 parsecs", "MB", True, None, 1.5])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_defaults_and_the_config_section() -> None:
    default = MediaConfig()
    assert default.allow_private_networks is False
    assert default.allowed_domains == []
    assert default.max_image_bytes == 20_000_000
    assert default.max_image_pixels == 40_000_000
    assert default.local_media_dir is None
    assert default.allowed_formats == ["png", "jpeg", "webp", "gif", "bmp"]
    config = MediaConfig.model_validate(
        {
            "allow_private_networks": False,
            "allowed_domains": ["Images.Example.COM.", "bücher.de"],
            "max_image_bytes": "20MB",
            "max_image_pixels": "40M",
            "allowed_formats": ["JPG", "png"],
        }
    )
    assert config.allowed_domains == ["images.example.com", "xn--bcher-kva.de"]
    assert config.allowed_formats == ["jpeg", "png"]


@pytest.mark.parametrize(
    "data",
    [
        {"allowed_domains": ["*.example.com"]},
        {"allowed_domains": ["http://example.com"]},
        {"allowed_domains": ["example.com:443"]},
        {"allowed_formats": ["tiff"]},
        {"max_image_byte": 10},
        {"fetch_timeout": 0},
    ],
)
def test_config_refuses(data: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        MediaConfig.model_validate(data)


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.31.0.1", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "cgnat"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "private"),
        ("255.255.255.255", "private"),
        ("::1", "loopback"),
        ("::", "unspecified"),
        ("fc00::1", "private"),
        ("fd00:ec2::254", "metadata"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "embedded-loopback"),
        ("::ffff:169.254.169.254", "embedded-metadata"),
        ("64:ff9b::a00:1", "embedded-private"),
        ("2002:7f00:1::", "embedded-loopback"),
        ("2001:db8::1", "private"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
        ("::ffff:93.184.216.34", None),
    ],
)
def test_address_classes(address: str, reason: str | None) -> None:
    assert classify(ipaddress.ip_address(address)) == reason


def test_allow_private_keeps_metadata_and_multicast_out() -> None:
    policy = AddressPolicy(allow_private=True)
    policy.check(ipaddress.ip_address("10.0.0.1"), 80)
    policy.check(ipaddress.ip_address("127.0.0.1"), 80)
    for address in ("169.254.169.254", "0.0.0.0", "224.0.0.1", "::ffff:169.254.169.254"):
        with pytest.raises(BlockedAddress):
            policy.check(ipaddress.ip_address(address), 80)


def test_trusted_endpoints_are_exact() -> None:
    policy = AddressPolicy(trusted=[("127.0.0.1", 8080)])
    policy.check(ipaddress.ip_address("127.0.0.1"), 8080)
    with pytest.raises(BlockedAddress):
        policy.check(ipaddress.ip_address("127.0.0.1"), 8081)


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "1.2.3.0x4", "a.0x10"])
def test_odd_ipv4_spellings_are_caught(host: str) -> None:
    assert looks_numeric(host)
    with pytest.raises(BlockedAddress):
        AddressPolicy(allow_private=True).check_host(host, 80)


def test_names_are_not_numeric() -> None:
    assert not looks_numeric("example.com")
    assert not looks_numeric("1.example")
    AddressPolicy().check_host("example.com", 80)  # names are checked when resolved


# ---------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        ("https://x/y.png", "http"),
        ("HTTP://x", "http"),
        ("data:image/png;base64,AAAA", "data"),
        ("file:///etc/passwd", "file"),
        ("ftp://x", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("/etc/passwd", "other"),
        ("iVBORw0KGgo=", "other"),
    ],
)
def test_reference_kinds(ref: str, kind: str) -> None:
    assert reference_kind(ref) == kind


def test_parse_drops_fragment_and_checks_allowlist() -> None:
    url = parse_http_url("https://Img.Example.com./a.png?sig=1#frag", ["img.example.com"])
    assert url.fragment == "" and url.query_string == "sig=1"
    with pytest.raises(MediaError) as info:
        parse_http_url("https://other.example.com/a.png", ["img.example.com"])
    assert info.value.code == "image_url_forbidden"


def test_redirect_targets_are_joined_and_checked() -> None:
    base = parse_http_url("https://img.example.com/a/b.png", [])
    assert str(redirect_target(base, "../c.png", [])) == "https://img.example.com/c.png"
    assert str(redirect_target(base, "//cdn.example.com/x", [])) == "https://cdn.example.com/x"
    for location in (
        "file:///etc/passwd",
        "https://u@img.example.com/",
        "https://a\\@b/",
        "https://x/\r\nSet-Cookie: a",
    ):
        with pytest.raises(MediaError):
            redirect_target(base, location, [])
    with pytest.raises(MediaError):
        redirect_target(base, "https://cdn.example.com/x", ["img.example.com"])


# ---------------------------------------------------------------- cache


def test_cache_is_bounded_by_entries_and_bytes() -> None:
    cache = MediaCache(max_entries=3, max_bytes=400)
    for i in range(5):
        cache.put(f"k{i}", "x" * 10)
    assert len(cache) == 3 and cache.get("k0") is None and cache.get("k4") == "x" * 10
    cache.get("k2")  # k2 is now the most recent: k3 goes first
    cache.put("big", "y" * 90)
    cache.put("big2", "z" * 90)
    assert cache.get("k3") is None and cache.get("k2") is not None
    cache.put("huge", "h" * 101)  # over a quarter of the budget: not cached
    assert cache.get("huge") is None
    assert cache.size_bytes <= 400


def test_cache_ttl() -> None:
    now = [0.0]
    cache = MediaCache(max_entries=10, max_bytes=10_000, clock=lambda: now[0])
    cache.put("u", "v", ttl=5)
    cache.put("b", "w")
    now[0] = 6
    assert cache.get("u") is None
    assert cache.get("b") == "w"


def test_cache_keys() -> None:
    assert key_for_bytes(b"a") != key_for_url("a")
    assert key_for_bytes(b"a") == key_for_bytes(b"a")
