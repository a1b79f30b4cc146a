import os
import socket

from engines.process.ports import listener_pids, pick_free_port, port_is_free


def test_a_picked_port_is_free_and_a_listening_one_is_not() -> None:
    port = pick_free_port("127.0.0.1")
    assert port_is_free("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not port_is_free("127.0.0.1", port)
    assert port_is_free("127.0.0.1", port)


def test_listener_pids_names_the_process_that_listens() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert listener_pids(port, [os.getpid()]) == {os.getpid()}
        assert listener_pids(port, [1]) in (set(), None)
    assert listener_pids(port, [os.getpid()]) == set()
