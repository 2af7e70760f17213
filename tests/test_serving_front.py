"""The HTTP front (`ditexport/serving/front.py`) alone, ahead of a plain HTTP/1.1 server standing in for Ray
Serve's proxy: what a client can make it hold. The front with Ray behind it is in test_serving_reliability.py."""
import asyncio
import select
import socket
import threading
import time

import pytest

h11 = pytest.importorskip("h11", reason="the HTTP front needs h11: pip install 'ditexport[serve]'")

from ditexport.serving.front import HttpFront  # noqa: E402
from ditexport.serving.settings import ServiceLimits  # noqa: E402
from ditexport.serving.sockets import free_loopback_port  # noqa: E402

PING = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
BIG_BODY = 32 * 2**20  # far beyond the kernel's socket buffers (4 MiB send, here)


class Upstream:
    """A keep-alive HTTP/1.1 server on its own thread: `{"ok": true}` to any request, BIG_BODY bytes to /big."""

    def __init__(self):
        self.port = free_loopback_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        async def serve():
            self.server = await asyncio.start_server(self.answer, "127.0.0.1", self.port)
            started.set()

        def run():
            self.loop.run_until_complete(serve())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        started.wait(10)

    @staticmethod
    async def answer(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = b"x" * BIG_BODY if head.split(b" ")[1] == b"/big" else b'{"ok": true}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def front():
    upstream = Upstream()
    limits = ServiceLimits(send_timeout_s=1.0, header_timeout_s=30.0)
    front = HttpFront("127.0.0.1", free_loopback_port(), ("127.0.0.1", upstream.port), limits, capacity=96,
                      body_limit=4096)
    front.start()
    yield front
    front.stop()
    upstream.stop()


def wait_for(condition, seconds: float) -> float | None:
    """Seconds until `condition()` held, or None when it did not within `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if condition():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def test_a_client_flooding_one_connection_with_pipelined_requests_is_held_back_by_tcp(front):
    """A client that pipelines requests as fast as it can (reading the answers) must not make the front buffer
    what it sends: the front keeps at most one request's bytes ahead of the one it answers. Before the bound it read
    64 KiB more with every answer: 400 answers left 25 MiB unanswered in flight (the front's memory grew 39 MiB)."""
    answers, sent = 400, 0

    async def flood():
        nonlocal sent
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)  # the client's own buffer out of the count
        sock.connect(("127.0.0.1", front.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        done = asyncio.Event()

        async def send():
            nonlocal sent
            while not done.is_set():
                writer.write(PING * 2000)
                await writer.drain()
                sent += len(PING) * 2000

        sender = asyncio.ensure_future(send())
        got = 0
        while got < answers:
            data = await asyncio.wait_for(reader.read(2**20), 30)
            assert data, "the front closed the connection"
            got += data.count(b"HTTP/1.1 200 ")
        done.set()
        sender.cancel()
        writer.transport.abort()
        return got

    got = asyncio.run(flood())
    in_flight = sent - got * len(PING)  # sent and not yet answered: the kernel's buffers plus the front's
    assert in_flight < 8 * 2**20, f"{in_flight / 2**20:.1f} MiB sent and unanswered after {got} answers"


def test_a_client_that_does_not_read_its_answer_is_cut_off_at_the_send_timeout(front):
    """A slow-read attack: a request for a large answer, never read. The front must drop the connection and the
    answer it holds at the send timeout (1 s here), not keep both for as long as the client likes."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", front.port))
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        assert wait_for(lambda: front.connections == 1, 5) is not None
        took = wait_for(lambda: front.connections == 0, 15)
        assert took is not None, "the connection is still open 15 s after its answer stalled"
        received = 0
        sock.settimeout(5)
        try:
            while data := sock.recv(2**20):
                received += len(data)
        except ConnectionResetError:
            pass
        assert received < BIG_BODY  # aborted: the rest of the answer was dropped, not sent on


def test_a_slow_reader_does_not_stop_others_being_answered(front):
    """While one client stalls on its answer, another's pipelined requests are answered in order."""
    with socket.socket() as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", front.port))
        slow.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        with socket.create_connection(("127.0.0.1", front.port), timeout=5) as other:
            other.sendall(PING * 3)  # three pipelined requests, answered in order on one connection
            answer = b""
            while answer.count(b'{"ok": true}') < 3:
                answer += other.recv(65536)
            assert answer.count(b"HTTP/1.1 200 ") == 3


def test_stop_closes_the_connections_still_open(front):
    """`stop` ends every open client connection (a client then reads EOF), instead of leaving their sockets to
    the garbage collector."""
    with socket.create_connection(("127.0.0.1", front.port), timeout=5) as idle:
        idle.sendall(b"GET /healthz HTTP/1.1\r\n")  # a request's head, half sent: the front waits for the rest
        assert wait_for(lambda: front.connections == 1, 5) is not None
        front.stop()
        readable, _, _ = select.select([idle], [], [], 5)
        assert readable, "the connection is still open 5 s after stop"
        assert idle.recv(65536) == b""


def test_the_front_raises_a_low_open_file_limit_to_hold_its_connections():
    """A process started at `ulimit -n 256` (many systems start at 1024) could accept about 120 clients, far below
    --max-connections: the front raises its soft limit to 2 x max_connections + FILE_HEADROOM where the hard
    limit allows."""
    resource = pytest.importorskip("resource", reason="open-file limits are POSIX")
    from ditexport.serving.sockets import FILE_HEADROOM

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * ServiceLimits.max_connections + FILE_HEADROOM
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"this machine's hard open-file limit ({hard}) is below what the front asks ({need})")
    code = ("import resource\n"
            "from ditexport.serving.front import HttpFront\n"
            "from ditexport.serving.sockets import free_loopback_port\n"
            "from ditexport.serving.settings import ServiceLimits\n"
            "front = HttpFront('127.0.0.1', free_loopback_port(), ('127.0.0.1', 9), ServiceLimits(), 96, 4096)\n"
            "front.start()\n"
            "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
            "front.stop()\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) >= need
