"""A gateway whose endpoint table has one row more than the default: ``POST /v2/rerank`` (Cohere's rerank API,
which vLLM serves and so does its stand-in), relayed as it is. test_endpoint_row.py runs it as a process:

    python -m tests.integration.endpoint_row_gateway CONFIG

The app is ``create_app`` given the table, served by uvicorn as every gateway process is (``uvicorn_config``);
SIGTERM stops it and its engines.
"""

from __future__ import annotations

import sys

import uvicorn

from gateway.app import create_app
from gateway.config.loader import load_config
from gateway.http.endpoints import ENDPOINTS, Endpoint
from gateway.http.server import uvicorn_config
from gateway.observability.log_setup import configure_logging
from gateway.proxy.body import BodyRule, documents_are_a_list

# The one row: nothing else in the gateway names this path.
ROW = Endpoint(
    "/v2/rerank",
    "rerank_v2",
    "rerank",
    capability="rerank",
    body=BodyRule(("query",), (documents_are_a_list,)),
    fast_path=True,
)


def main(config_path: str) -> None:
    config = load_config(config_path)
    settings = config.server
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(config, endpoints=ENDPOINTS.with_rows(ROW))
    uvicorn.Server(uvicorn_config(app, settings, host=settings.host, port=settings.port)).run()


if __name__ == "__main__":
    main(sys.argv[1])
