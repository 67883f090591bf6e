"""Shutting down cleanly: once the server is stopping, every answer says `Connection: close`, and no kept-alive
connection is closed under a request that may be on its way.

`bentoml serve` answers on uvicorn (0.55 with BentoML 1.4.39). At SIGTERM uvicorn stops accepting, then calls
each open connection's `shutdown` (uvicorn/protocols/http/h11_impl.py, httptools_impl.py): a connection idle at
that instant is closed at once, a busy one after its answer, an answer that with h11 does not say
`Connection: close`. A client on a kept-alive connection is told nothing: the request it sends next, perhaps
already on the wire, meets a closed socket, and it gets a reset or an empty reply without knowing whether the
request ran (measured: each of 16 clients sending in a loop lost one request so; tests/test_serve_reliability.py).

`mend_uvicorn_shutdown` replaces that `shutdown`: from then on every answer begun carries `Connection: close`,
and the protocol closes the connection after it, so a client learns with its answer that the connection is
done and opens a new one. A connection idle at shutdown stays open for its next request; one that sends
nothing is closed after uvicorn's keep-alive timeout (`timeout_keep_alive`, 5 s in BentoML), as it would be at
any other time. An answer begun before shutdown cannot gain the header; its connection stays open for one more
request, answered with it. The drain takes at most that timeout longer than the requests in flight.

Not covered here: a connection opened during the drain. BentoML's arbiter (circus) holds the listening socket
open until its workers have exited, so the kernel queues such a connection and resets it when the arbiter
exits; its request was never read (in that test, each client's first new connection). Closing the shared
socket from a worker would also end it for the workers circus starts next (`bentoml serve --reload` restarts
them on the same socket), so it stays open.
"""

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("bentoml.train_to_deploy")

CLOSE = (b"connection", b"close")


def _protocols() -> list[type]:
    """uvicorn's HTTP/1.1 protocols that BentoML may run: httptools when installed (uvicorn's "auto"), else h11."""
    classes: list[type] = [H11Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional
        pass
    else:
        classes.append(HttpToolsProtocol)
    return classes


_uvicorn_shutdown = {cls: cls.shutdown for cls in _protocols()}


def _uvicorn_own(protocol):
    return next(f for cls, f in _uvicorn_shutdown.items() if isinstance(protocol, cls))


def _drain(protocol) -> None:
    """In place of uvicorn's `shutdown`: called for each open connection as the server starts to shut down."""
    try:
        state = protocol.server_state
        if CLOSE not in state.default_headers:  # every request begun from now on: uvicorn copies them per request
            state.default_headers = [*state.default_headers, CLOSE]
        cycle = protocol.cycle  # the request on this connection, if any
        if cycle is not None and not cycle.response_started and CLOSE not in cycle.default_headers:
            cycle.default_headers = [*cycle.default_headers, CLOSE]
        grace_s = protocol.timeout_keep_alive
    except AttributeError as e:  # a uvicorn whose protocols differ from 0.55's: its own shutdown, not none
        logger.warning("serve.drain does not know this uvicorn (%s): connections close as uvicorn closes them", e)
        return _uvicorn_own(protocol)(protocol)
    asyncio.get_running_loop().call_later(grace_s, _close_if_idle, protocol)


def _close_if_idle(protocol) -> None:
    """Close a connection that has not begun a request since shutdown (one that has closes after its answer)."""
    if not protocol.transport.is_closing() and (protocol.cycle is None or protocol.cycle.response_complete):
        _uvicorn_own(protocol)(protocol)  # closes an idle connection


def mend_uvicorn_shutdown() -> None:
    """Make uvicorn drain as above. Call before the server starts (`serve.service` does, at import)."""
    for cls in _uvicorn_shutdown:
        cls.shutdown = _drain
