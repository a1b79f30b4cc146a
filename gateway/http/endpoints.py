"""The endpoint table: every path the gateway answers, in one place, and the lookups the edge makes on it.

One row per path says its metrics label, the permission a key needs for it, and, for the paths that reach
an engine, what the engine must serve (a capability of its adapter), the path it is posted to and how its
stream ends. A *passthrough* row (``fast_path``) is also a whole endpoint: its body is checked by its
``body`` rule, the pipeline posts it to the engine, routes/openai registers its FastAPI route and the
middleware answers it directly. Adding such an endpoint is one row.

What derives from the table: the middleware's labels and fast path, the key ring's permissions, the body
rules and engine paths of gateway/proxy/pipeline.py, and the OpenAI POST routes. The handlers of the
other rows (routes/simple, routes/generate) read their rows from here.

The engine-side path lives here, not in engines/adapters: it is the API's (OpenAI's, LightLLM's), the same
on every engine kind; an adapter says only which capabilities its engine serves.

A row also says which error dialect its clients read (``errors``: the middleware's own errors, admission's,
the relay's, an engine's reshaped, and a broken stream's last event) and which of the client's headers go on
to the engine (``forward_headers``: Anthropic's ``anthropic-version``, which LMDeploy requires).

Permissions of the engine-native rows: the client dialects and the tokenizer are ``chat`` (counting a chat
prompt's tokens is part of chatting: ``/v1/messages/count_tokens``, ``/tokenize`` of ``messages``);
``/v1/score`` is ``rerank`` (the same cross-encoders); ``/v1/classify`` and ``/pooling`` are ``embeddings``
(pooling models); audio is ``audio`` and image generation ``images``. Stored responses
(``/v1/responses/{id}``) are not routed (routes/responses.py says why).

The config's ``passthrough:`` section (gateway/config/passthrough.py) adds rows of its own: a fast-path row
per path, served by the engine kinds its entry names (``engines``) rather than by an adapter's capability.
``endpoint_table`` is the module's rows plus those; the owner's app and every worker's are built from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from engines.adapters import Capability, StreamEnd
from engines.spec import EngineKind
from gateway.config.auth import Permission
from gateway.config.passthrough import PassthroughPath
from gateway.http.errors import ANTHROPIC, OPENAI, ErrorDialect
from gateway.proxy.body import BodyRule, documents_are_a_list, messages_are_objects, prompt_or_messages

PUBLIC: Final = "public"
ANY: Final = "any"  # any valid key: routes with no permission of their own (and unknown paths, so they stay dark)
Access = Permission | Literal["public", "any"]
OTHER: Final = "other"  # the metrics label of a path that is in no row


@dataclass(frozen=True)
class Endpoint:
    """One row: a path (or a tree of paths) the gateway answers, and what the edge and the pipeline need."""

    path: str
    label: str  # the ``endpoint`` label of the request metrics
    permission: Access
    # True: also every path below (``path + "/..."``), for the trees of routes with path parameters.
    subtree: bool = False
    # /metrics: public unless ``auth.metrics_public`` is false, then ``permission``.
    public_by_config: bool = False
    # -- rows that reach an engine --
    capability: Capability | None = None  # what the model's engine must serve (EngineAdapter.capabilities)
    # A configured passthrough (``passthrough:``): the engine kinds that serve it, said by the config, not by
    # an adapter's capability; a model on another kind is refused (gateway/proxy/pipeline.py, ``serves``).
    engines: frozenset[EngineKind] | None = None
    engine_path: str | None = None  # where the body is posted on the engine; None: ``path``
    body: BodyRule = field(default_factory=BodyRule)  # the JSON body's required fields and checks
    stream_end: StreamEnd | None = None  # how a stream ends; None: as the engine's adapter says
    media: bool = False  # image parts of chat ``messages`` are fetched and reshaped for the engine first
    # A passthrough (POST): answered by the generic pipeline, on the middleware's fast path.
    fast_path: bool = False
    # -- every row --
    errors: ErrorDialect = OPENAI  # the shape of every error on this path
    # Client headers sent on to the engine: (name, value when the client sent none; None: then not sent).
    forward_headers: tuple[tuple[str, str | None], ...] = ()

    def __post_init__(self) -> None:
        served = self.capability is not None or self.engines is not None
        if self.fast_path and (not served or self.subtree or self.public_by_config):
            raise ValueError(
                f"{self.path}: a fast-path row needs a capability (or engine kinds), one path, and a fixed permission"
            )

    @property
    def upstream_path(self) -> str:
        """The path the pipeline posts to on the engine."""
        return self.engine_path or self.path


# The rows other modules name.
CHAT = Endpoint(
    "/v1/chat/completions",
    "chat",
    "chat",
    capability="chat",
    body=BodyRule(("messages",), (messages_are_objects,)),
    media=True,
    fast_path=True,
)
# Client dialects: native where the adapter lists them, else translated to chat (gateway/dialects). A native
# stream ends with the dialect's own last event, at a clean end of the body ("eof"); a translated one as the
# engine's chat stream ends (the adapter's stream_end).
RESPONSES = Endpoint(
    "/v1/responses",
    "responses",
    "chat",
    capability="responses",
    body=BodyRule(("input",)),
    stream_end="eof",
    fast_path=True,
)
# Anthropic clients: their errors in Anthropic's shape; the version header on to the engine (LMDeploy answers
# 400 without it; the anthropic SDK always sends it, curl users may not).
_ANTHROPIC_HEADERS = (("anthropic-version", "2023-06-01"), ("anthropic-beta", None))
MESSAGES = Endpoint(
    "/v1/messages",
    "messages",
    "chat",
    capability="messages",
    body=BodyRule(("messages", "max_tokens")),
    stream_end="eof",
    fast_path=True,
    errors=ANTHROPIC,
    forward_headers=_ANTHROPIC_HEADERS,
)
# Multipart: the model is a form field (routes/audio).
TRANSCRIPTIONS = Endpoint("/v1/audio/transcriptions", "audio", "audio", capability="transcription")
TRANSLATIONS = Endpoint("/v1/audio/translations", "audio", "audio", capability="transcription")
GENERATE = Endpoint("/generate", "generate", "completions", capability="generate", stream_end="eof")
GENERATE_STREAM = Endpoint("/generate_stream", "generate", "completions", capability="generate", stream_end="eof")


class EndpointTable:
    """The rows, looked up by ``scope["path"]`` (never the Host header or the raw URL): an exact path first,
    then the longest subtree that holds it."""

    def __init__(self, rows: Iterable[Endpoint]) -> None:
        self.rows: tuple[Endpoint, ...] = tuple(rows)
        self._exact: dict[str, Endpoint] = {}
        seen: set[tuple[str, bool]] = set()
        for row in self.rows:
            if (row.path, row.subtree) in seen:
                raise ValueError(f"{row.path}: two rows for one path")
            seen.add((row.path, row.subtree))
        # A path may have one exact row and one subtree row (POST /v1/messages and what lies below it): the
        # exact one answers the path itself.
        for row in sorted(self.rows, key=lambda r: r.subtree):
            self._exact.setdefault(row.path, row)
        self._subtrees = sorted((r for r in self.rows if r.subtree), key=lambda r: len(r.path), reverse=True)
        self._fast = {r.path: r for r in self.rows if r.fast_path}

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.rows)

    def with_rows(self, *rows: Endpoint) -> EndpointTable:
        """This table and ``rows``."""
        return EndpointTable((*self.rows, *rows))

    def errors(self, path: str) -> ErrorDialect:
        """The error dialect of ``path``'s clients."""
        row = self.by_path(path)
        return OPENAI if row is None else row.errors

    def by_path(self, path: str) -> Endpoint | None:
        found = self._exact.get(path)
        if found is not None:
            return found
        for row in self._subtrees:
            if path.startswith(row.path) and path[len(row.path) : len(row.path) + 1] == "/":
                return row
        return None

    def label(self, path: str) -> str:
        row = self.by_path(path)
        return OTHER if row is None else row.label

    def permission(self, path: str, *, metrics_public: bool) -> Access:
        row = self.by_path(path)
        if row is None:
            return ANY
        return PUBLIC if row.public_by_config and metrics_public else row.permission

    def fast_path(self, path: str) -> Endpoint | None:
        """The passthrough row of ``path`` (a POST to it is answered by the pipeline), or None."""
        return self._fast.get(path)

    def passthroughs(self) -> tuple[Endpoint, ...]:
        return tuple(self._fast.values())

    def configured(self) -> tuple[Endpoint, ...]:
        """The rows of the config's ``passthrough:`` section."""
        return tuple(r for r in self.rows if r.engines is not None)


ENDPOINTS: Final = EndpointTable(
    (
        # The OpenAI passthroughs.
        CHAT,
        Endpoint(
            "/v1/completions",
            "completions",
            "completions",
            capability="completions",
            body=BodyRule(("prompt",)),
            fast_path=True,
        ),
        Endpoint(
            "/v1/embeddings",
            "embeddings",
            "embeddings",
            capability="embeddings",
            body=BodyRule(("input",)),
            fast_path=True,
        ),
        Endpoint(
            "/v1/rerank",
            "rerank",
            "rerank",
            capability="rerank",
            body=BodyRule(("query",), (documents_are_a_list,)),
            fast_path=True,
        ),
        # Client dialects (the rows above the table).
        RESPONSES,
        Endpoint("/v1/responses", "responses", "chat", subtree=True),  # stored responses: routes/responses
        MESSAGES,
        Endpoint(
            "/v1/messages/count_tokens",
            "messages",
            "chat",
            capability="count_tokens",
            body=BodyRule(("messages",)),
            fast_path=True,
            errors=ANTHROPIC,
            forward_headers=_ANTHROPIC_HEADERS,
        ),
        Endpoint("/v1/messages", "messages", "chat", subtree=True, errors=ANTHROPIC),  # the rest: Anthropic 404s
        # Engine-native endpoints, relayed as they are.
        Endpoint(
            "/tokenize",
            "tokenize",
            "chat",
            capability="tokenize",
            body=BodyRule((), (prompt_or_messages,)),
            fast_path=True,
        ),
        Endpoint("/detokenize", "tokenize", "chat", capability="tokenize", body=BodyRule(("tokens",)), fast_path=True),
        Endpoint("/v1/score", "score", "rerank", capability="score", fast_path=True),
        Endpoint(
            "/v1/classify", "classify", "embeddings", capability="classify", body=BodyRule(("input",)), fast_path=True
        ),
        Endpoint("/pooling", "pooling", "embeddings", capability="pooling", fast_path=True),
        Endpoint("/v1/audio/speech", "audio", "audio", capability="speech", body=BodyRule(("input",)), fast_path=True),
        Endpoint(
            "/v1/images/generations",
            "images",
            "images",
            capability="images",
            body=BodyRule(("prompt",)),
            fast_path=True,
        ),
        TRANSCRIPTIONS,
        TRANSLATIONS,
        Endpoint("/v1/models", "models", "models", subtree=True),  # also /v1/models/{id}
        # LightLLM's own API (routes/generate).
        GENERATE,
        GENERATE_STREAM,
        # The simple endpoints (routes/simple): each sends the CHAT row's request.
        Endpoint("/infer", "infer", "chat"),
        Endpoint("/infer/upload", "infer", "chat"),
        Endpoint("/analyze", "analyze", "chat"),
        Endpoint("/analyze/upload", "analyze", "chat"),
        # Operations (routes/ops, routes/gpu, routes/admin).
        Endpoint("/health", "ops", PUBLIC),
        Endpoint("/ready", "ops", PUBLIC),
        Endpoint("/v1/health", "ops", PUBLIC),
        Endpoint("/metrics", "ops", "metrics", public_by_config=True),
        Endpoint("/gpu/status", "ops", "admin"),
        Endpoint("/admin", "admin", "admin", subtree=True),
    )
)


def configured_row(path: str, entry: PassthroughPath) -> Endpoint:
    """The row of one ``passthrough:`` entry: a POST relayed as it is (only ``model`` is required, and the
    gateway's own body checks apply), to the same path on the engine."""
    return Endpoint(path, entry.label or path, entry.permission, engines=frozenset(entry.engines), fast_path=True)


def endpoint_table(passthrough: Mapping[str, PassthroughPath]) -> EndpointTable:
    """The module's rows and the config's ``passthrough:`` rows. A ValueError names a configured path that the
    gateway answers itself (a row, or a path below a tree of rows: ``/admin/...`` stays ``admin``)."""
    taken = [f"{path} (the gateway's {row.path})" for path in passthrough if (row := ENDPOINTS.by_path(path))]
    if taken:
        raise ValueError("passthrough: the gateway answers these paths itself: " + ", ".join(taken))
    return ENDPOINTS.with_rows(*(configured_row(path, entry) for path, entry in passthrough.items()))
