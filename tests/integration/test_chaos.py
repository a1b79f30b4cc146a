"""J1 + J2 in small: 20 concurrent streams through a real gateway for 8 s while an engine is SIGKILLed every
2 s. The long version, with its figures, is ``tests/bench/chaos.py``."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests import chaos
from tests.helpers import run_gateway, standin_command

pytestmark = pytest.mark.timeout(120)


def test_every_stream_ends_well_while_engines_are_killed(tmp_path: Path) -> None:
    config = chaos.config(token_interval=0.02, command=standin_command("vllm"), total_timeout=30)
    with run_gateway(config, tmp_path) as gw:  # on the way out: no process of any launch outlives it
        report = asyncio.run(chaos.run(gw.url, gw.proc.pid, ["a", "b"], chaos.Load(deadline=45)))
        assert report.problems() == []
        assert len(report.kills) >= 2
        # Streams completed, and the kills cut some short or found their model restarting: all well-formed.
        assert report.outcomes["ok"] > 0
        assert report.outcomes["error_event"] + report.outcomes["http_error"] > 0
        assert set(report.codes) <= {"upstream_disconnected", "engine_unavailable"}
        assert gw.proc.poll() is None
