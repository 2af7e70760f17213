"""The local service's HTTP front: an HTTP/1.1 server (h11, asyncio) on `serve`'s --host/--port ahead of Ray
Serve's proxy, which listens on a loopback port of its own.

It holds what Ray's proxy does not: header size (431) and body size (413) limits, read timeouts for headers and
bodies (408), a keep-alive timeout, a bound on open connections, and admission: image requests beyond what the
replicas hold (`ServiceLimits.capacity`) get 503 + Retry-After at once, estimated from the measured drain rate,
instead of waiting in Ray's proxy. A replica that dies under a request (Ray answers a bare 500) becomes a JSON 503
+ Retry-After. /healthz and /v1/models are forwarded without counting against admission.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import deque
from http import HTTPStatus

import h11

from .settings import ServiceLimits, drain_rate, request_id_of, retry_after_s
from .sockets import raise_file_limit

log = logging.getLogger("ditexport.serving")

IMAGES = b"/v1/images"
HEALTH_TIMEOUT_S = 5.0  # /healthz and /v1/models answer in milliseconds; longer means the replica is gone
LINGER_S, LINGER_BYTES = 2.0, 2**26
# What the front passes on: the rest (hop-by-hop headers, Expect, the client's own Content-Length) it sets itself.
FORWARDED = {b"content-type", b"accept", b"user-agent", b"x-request-id"}


class ClientGone(Exception):
    """The client closed its connection while its request was being answered (its request is cancelled), or did
    not take its answer within the send timeout (the connection is aborted, its buffered answer dropped)."""


class Refusal(Exception):
    """An answer decided before forwarding: (status, message, field, Retry-After); the connection closes."""

    def __init__(self, status: int, message: str, field: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.field, self.retry_after = status, field, retry_after


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def json_response(status: int, answer: dict, headers: dict | None = None, close: bool = False) -> tuple:
    body = json.dumps(answer).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), str(v).encode()) for k, v in (headers or {}).items()]
    if close:
        head.append((b"connection", b"close"))
    return status, head, body


class HttpFront:
    """Serves host:port on its own thread and event loop; `start` returns once it listens, `stop` closes it."""

    def __init__(self, host: str, port: int, upstream: tuple[str, int], limits: ServiceLimits, capacity: int,
                 body_limit: int):
        self.host, self.port, self.upstream, self.limits = host, port, upstream, limits
        self.capacity, self.body_limit = capacity, body_limit
        self.read_ahead = limits.max_header_bytes + body_limit  # pipelined bytes kept while a request is answered
        self.connections = 0  # open client connections
        self.inflight = 0  # image requests forwarded and not yet answered
        self._finished_at: deque[float] = deque(maxlen=1024)
        self._idle: list = []  # upstream keep-alive connections: (reader, writer, h11 client)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        raise_file_limit(self.limits.max_connections)
        ready: list = []
        started = threading.Event()

        def run():
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(
                    self._connection, self.host, self.port, backlog=self.limits.max_connections,
                    limit=self.limits.max_header_bytes + 1024))
                ready.append(None)
            except BaseException as e:  # noqa: BLE001 - reported to the caller of start()
                ready.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="ditexport-http-front", daemon=True)
        self._thread.start()
        started.wait()
        if ready and ready[0] is not None:
            raise OSError(f"cannot listen on {self.host}:{self.port}: {ready[0]}")

    def stop(self) -> None:
        if self._loop is None:
            return

        async def close():
            if self._server is not None:
                self._server.close()
            for _, writer, _ in self._idle:
                writer.close()
            self._idle.clear()
            # The connections still open (and their forwards) end now, each closing its socket.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None

    # -- admission ---------------------------------------------------------------------------------

    def drain_per_s(self) -> float | None:
        return drain_rate(self._finished_at, time.monotonic())

    def retry_after(self) -> int:
        return retry_after_s(self.inflight, self.drain_per_s())

    # -- one client connection ---------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.limits.max_connections:
            await self._send_raw(writer, *json_response(
                503, {"error": f"the server holds {self.limits.max_connections} connections; retry later"},
                {"Retry-After": self.retry_after()}, close=True))
            return
        self.connections += 1
        peer = writer.get_extra_info("peername")
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        first = True
        try:
            while True:
                try:
                    request = await self._read_head(conn, reader, first)
                    if request is None:
                        return
                    first = False
                    status, headers, body = await self._answer(conn, reader, writer, request, peer)
                except Refusal as e:
                    answer = {"error": str(e)}
                    if e.field:
                        answer["field"] = e.field
                    retry = {"Retry-After": e.retry_after} if e.retry_after is not None else {}
                    await self._send_raw(writer, *json_response(e.status, answer, retry, close=True), reader=reader)
                    return
                if conn.our_state is not h11.SEND_RESPONSE:
                    return  # the client went away while we waited
                writer.write(conn.send(h11.Response(status_code=status, headers=headers, reason=reason(status))))
                writer.write(conn.send(h11.Data(data=body)))
                writer.write(conn.send(h11.EndOfMessage()))
                await self._drain(writer)
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    return
        except (ClientGone, ConnectionError, asyncio.IncompleteReadError, h11.LocalProtocolError):
            return
        finally:
            self.connections -= 1
            writer.close()

    async def _receive(self, conn: h11.Connection, reader: asyncio.StreamReader, deadline: float, what: str,
                       status: int):
        """The next h11 event, reading until `deadline` (monotonic); past it, `status` (408) and close."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as e:
                hint = e.error_status_hint
                if hint == 431 or "exceeds" in str(e) or "too long" in str(e):
                    raise Refusal(431, f"the request's line and headers exceed {self.limits.max_header_bytes} "
                                       "bytes") from None
                raise Refusal(hint if 400 <= hint < 500 else 400, f"malformed HTTP request: {e}") from None
            if event is not h11.NEED_DATA:
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Refusal(status, f"the client took longer than this server's {what}")
            try:
                data = await asyncio.wait_for(reader.read(65536), remaining)
            except asyncio.TimeoutError:
                raise Refusal(status, f"the client took longer than this server's {what}") from None
            conn.receive_data(data)  # b"": the client closed; h11 then says so (or refuses a cut message)

    async def _read_head(self, conn, reader, first: bool):
        """The next request's head; None when the client closed or idled past the keep-alive timeout."""
        lim = self.limits
        if not first and not conn.trailing_data[0]:
            try:  # keep-alive: the next request's first bytes
                data = await asyncio.wait_for(reader.read(65536), lim.keep_alive_timeout_s)
            except asyncio.TimeoutError:
                return None
            conn.receive_data(data)
            if not data:
                return None
        event = await self._receive(conn, reader, time.monotonic() + lim.header_timeout_s,
                                    f"header timeout of {lim.header_timeout_s:g} s", 408)
        if not isinstance(event, h11.Request):
            return None
        # h11 bounds a head that arrives in pieces; one that arrives whole is measured here.
        size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
        if size > lim.max_header_bytes:
            raise Refusal(431, f"the request's line and headers exceed {lim.max_header_bytes} bytes")
        return event

    async def _read_body(self, conn, reader) -> bytes:
        lim = self.limits
        deadline = time.monotonic() + lim.body_timeout_s
        body = bytearray()
        while True:
            event = await self._receive(conn, reader, deadline, f"body timeout of {lim.body_timeout_s:g} s", 408)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.body_limit:
                    raise self._too_large()
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the client closed while sending its body")

    def _too_large(self) -> Refusal:
        return Refusal(413, f"the body is larger than this server's limit of {self.body_limit} bytes", "body")

    async def _answer(self, conn, reader, writer, request: h11.Request, peer) -> tuple:
        headers = {k.lower(): v for k, v in request.headers}
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.body_limit:  # h11 checked it is a number
            raise self._too_large()
        if conn.client_is_waiting_for_100_continue:  # curl asks before a body over 1 KiB
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = await self._read_body(conn, reader)
        path = request.target.split(b"?")[0]
        request_id = request_id_of(headers.get(b"x-request-id", b"").decode("latin-1"))
        image = request.method == b"POST" and path == IMAGES
        if image and self.inflight >= self.capacity:
            return json_response(503, {"error": f"the service is full ({self.inflight} requests running or "
                                                f"waiting); retry later", "request_id": request_id},
                                 {"Retry-After": self.retry_after(), "X-Request-ID": request_id})
        forward = [(k, v) for k, v in request.headers if k.lower() in FORWARDED and k.lower() != b"x-request-id"]
        forward += [(b"host", f"{self.upstream[0]}:{self.upstream[1]}".encode()),
                    (b"x-request-id", request_id.encode()),
                    (b"x-forwarded-for", str(peer[0] if peer else "").encode()),
                    (b"content-length", str(len(body)).encode())]
        timeout = self.limits.request_timeout_s + 5 if image else HEALTH_TIMEOUT_S
        if image:
            self.inflight += 1
        try:
            status, up_headers, up_body = await self._forward_watching(
                reader, conn, h11.Request(method=request.method, target=request.target, headers=forward), body,
                timeout)
        except asyncio.TimeoutError:
            log.warning(f"request {request_id}: no answer from the replicas within {timeout:g} s")
            return json_response(503, {"error": f"no answer within {timeout:g} s; retry later",
                                       "request_id": request_id},
                                 {"Retry-After": self.limits.restart_retry_after_s, "X-Request-ID": request_id})
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError) as e:
            log.warning(f"request {request_id}: the service's proxy failed: {e!r}")
            return json_response(503, {"error": "the service is restarting; retry later", "request_id": request_id},
                                 {"Retry-After": self.limits.restart_retry_after_s, "X-Request-ID": request_id})
        finally:
            if image:
                self.inflight -= 1
        if image and status == 200:
            self._finished_at.append(time.monotonic())
        kind = dict(up_headers).get(b"content-type", b"")
        if status >= 500 and not kind.startswith(b"application/json"):
            # Ray's own answer: a replica died under the request (500) or Ray's queue was full (503).
            retry = dict(up_headers).get(b"retry-after") if status == 503 else None
            log.warning(f"request {request_id}: Ray Serve answered {status}: {up_body[:200]!r}")
            message = ("the service is full; retry later" if status == 503 else
                       "the replica serving this request stopped; Ray is restarting it, retry later")
            return json_response(503, {"error": message, "request_id": request_id},
                                 {"Retry-After": int(retry) if retry and retry.isdigit()
                                  else self.limits.restart_retry_after_s, "X-Request-ID": request_id})
        keep = [(k, v) for k, v in up_headers if k in (b"content-type", b"retry-after", b"x-request-id")]
        return status, keep + [(b"content-length", str(len(up_body)).encode())], up_body

    async def _forward_watching(self, reader, conn, request, body, timeout):
        """Forwards while watching the client: a client that hangs up cancels the upstream request (Ray then
        cancels the replica's handler, which frees the request's slots). What a pipelining client sends meanwhile
        is kept for the next cycle up to one largest request (`read_ahead`); beyond it the front stops reading, so
        a client that floods one connection with pipelined requests is held back by TCP, not buffered here."""
        upstream = asyncio.ensure_future(asyncio.wait_for(self._forward(request, body), timeout))
        room = self.read_ahead - len(conn.trailing_data[0])
        if room <= 0:
            return await upstream
        watch = asyncio.ensure_future(reader.read(min(65536, room)))
        try:
            done, _ = await asyncio.wait({upstream, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                data = watch.result()
                if not data:
                    upstream.cancel()
                    raise ClientGone()
                conn.receive_data(data)  # a pipelined request: h11 keeps it for the next cycle
            return await upstream
        finally:
            if not watch.done():
                watch.cancel()

    async def _forward(self, request: h11.Request, body: bytes) -> tuple[int, list, bytes]:
        reader, writer, client = await self._upstream()
        ok = False
        try:
            writer.write(client.send(request) + client.send(h11.Data(data=body)) + client.send(h11.EndOfMessage()))
            await writer.drain()
            response, chunks = None, []
            while True:
                event = client.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    client.receive_data(data)
                    if not data and response is None:
                        raise ConnectionResetError("Ray Serve's proxy closed the connection")
                    continue
                if isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    chunks.append(event.data)
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
            ok = client.our_state is h11.DONE and client.their_state is h11.DONE
            return response.status_code, list(response.headers), b"".join(chunks)
        finally:
            if ok:
                client.start_next_cycle()
                self._idle.append((reader, writer, client))
            else:
                writer.close()

    async def _upstream(self):
        while self._idle:
            reader, writer, client = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, client
            writer.close()
        reader, writer = await asyncio.open_connection(*self.upstream, limit=2**22)
        return reader, writer, h11.Connection(h11.CLIENT, max_incomplete_event_size=2**20)

    async def _drain(self, writer: asyncio.StreamWriter) -> None:
        """Waits until the answer is with the kernel; a client that does not read it within the send timeout (a
        slow-read attack holding answers in memory) has its connection aborted, unsent bytes dropped."""
        try:
            await asyncio.wait_for(writer.drain(), self.limits.send_timeout_s)
        except asyncio.TimeoutError:
            writer.transport.abort()
            raise ClientGone() from None

    async def _send_raw(self, writer, status: int, headers: list, body: bytes, reader=None) -> None:
        head = f"HTTP/1.1 {status} ".encode() + reason(status) + b"\r\n"
        head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        try:
            writer.write(head + b"\r\n" + body)
            await self._drain(writer)
            if reader is not None and writer.can_write_eof():
                # A lingering close: a client still sending (a refused 200 MB body) reads the answer before the
                # close resets the connection; at most LINGER_S and LINGER_BYTES of its data are discarded.
                writer.write_eof()
                deadline, discarded = time.monotonic() + LINGER_S, 0
                while discarded < LINGER_BYTES and (left := deadline - time.monotonic()) > 0:
                    data = await asyncio.wait_for(reader.read(65536), left)
                    if not data:
                        break
                    discarded += len(data)
        except (ClientGone, ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            writer.close()
