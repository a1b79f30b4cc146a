from engines.replica.state import TRANSITIONS, EngineState, can_transition

S = EngineState


def test_values_are_lowercase_names() -> None:
    assert [s.value for s in S] == [
        "stopped",
        "starting",
        "ready",
        "unhealthy",
        "backoff",
        "failed",
        "stopping",
        "sleeping",
        "waking",
    ]
    assert S("ready") is S.READY and f"{S.BACKOFF}" == "backoff"


def test_every_state_has_a_row_and_no_self_loops() -> None:
    assert set(TRANSITIONS) == set(S)
    for state, targets in TRANSITIONS.items():
        assert state not in targets


def test_the_supervision_loop_of_the_design() -> None:
    allowed = {
        (S.STOPPED, S.STARTING),
        (S.STARTING, S.READY),
        (S.STARTING, S.BACKOFF),
        (S.STARTING, S.FAILED),
        (S.STARTING, S.STOPPING),
        (S.READY, S.BACKOFF),
        (S.READY, S.FAILED),
        (S.READY, S.STOPPING),
        (S.READY, S.STARTING),
        (S.READY, S.UNHEALTHY),
        (S.UNHEALTHY, S.READY),
        (S.UNHEALTHY, S.BACKOFF),
        (S.UNHEALTHY, S.FAILED),
        (S.UNHEALTHY, S.STOPPING),
        (S.BACKOFF, S.STARTING),
        (S.BACKOFF, S.STOPPING),
        (S.FAILED, S.STARTING),
        (S.FAILED, S.STOPPING),
        (S.STOPPING, S.STOPPED),
        (S.STOPPING, S.STARTING),
        (S.READY, S.SLEEPING),  # sleep mode: only a READY engine is put to sleep
        (S.SLEEPING, S.WAKING),
        (S.SLEEPING, S.STOPPING),
        (S.SLEEPING, S.STOPPED),  # died asleep: not restarted
        (S.WAKING, S.READY),
        (S.WAKING, S.BACKOFF),  # the wake failed: a cold restart
        (S.WAKING, S.FAILED),
        (S.WAKING, S.STOPPING),
    }
    for old in S:
        for new in S:
            assert can_transition(old, new) == ((old, new) in allowed), (old, new)


def test_only_stopping_leads_to_stopped_and_every_state_but_stopped_can_stop() -> None:
    # ... and SLEEPING: an engine that died asleep is STOPPED there and then (there was nothing to stop).
    assert [s for s in S if can_transition(s, S.STOPPED)] == [S.STOPPING, S.SLEEPING]
    assert {s for s in S if can_transition(s, S.STOPPING)} == set(S) - {S.STOPPED, S.STOPPING}


def test_argv_redaction_hides_secret_values_only() -> None:
    from engines.replica.snapshot import redact_argv

    argv = [
        "vllm",
        "serve",
        "/m",
        "--api-key",
        "sk-1",
        "sk-2",
        "--tokenizer",
        "/tok",
        "--hf-token=hf_x",
        "--port",
        "8000",
        "--ssl-keyfile",
        "/k.pem",
    ]
    assert redact_argv(argv) == [
        "vllm",
        "serve",
        "/m",
        "--api-key",
        "***",
        "***",
        "--tokenizer",
        "/tok",
        "--hf-token=***",
        "--port",
        "8000",
        "--ssl-keyfile",
        "/k.pem",
    ]
