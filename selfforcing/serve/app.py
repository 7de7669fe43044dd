"""The FastAPI app: ``/`` (the web page), ``/ws/stream`` (the streaming protocol), ``/health``, ``/models`` and
``POST /generate``. See :mod:`selfforcing.serve.protocol` for the messages and the README's "Serving" section.

``create_app(checkpoint)`` loads the model once; ``ServerThread(app)`` runs it on uvicorn in a thread (tests,
benchmarks); ``selfforcing serve`` runs it in the foreground.

With a token, a client is authenticated before it takes a session slot: by the header ``Authorization: Bearer T``
(or ``X-Token: T``), by a first message ``{"type": "auth", "token": T}`` (or a start message carrying ``token``),
or, for old clients, by ``?token=T`` in the URL. A connection that has not authenticated within ``auth_timeout_s``
is closed (1008) and never counts against ``max_sessions``. The token is redacted from every log line (uvicorn's
access and error logs included, see :class:`RedactingFilter`), each connection logs at most
``MAX_ERROR_LOGS_PER_CONNECTION`` error lines, and the API docs (/docs, /redoc, /openapi.json) are off.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import socket
import tempfile
import threading
import time

from fastapi import Depends, FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response

from .protocol import (
    MAX_PROMPT_CHARS,
    AuthMessage,
    GenerateRequest,
    PauseMessage,
    PromptMessage,
    ProtocolError,
    ResumeMessage,
    StartMessage,
    StopMessage,
    message,
    parse_client_message,
)
from .sessions import Busy, ModelHost, Session

log = logging.getLogger("selfforcing.serve")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
WS_MAX_MESSAGE_BYTES = 1 << 20  # larger client messages close the connection (1009); smaller bad ones get errors
AUTH_TIMEOUT_S = 5.0  # a client that must send its token in the first message has this long to do so
MAX_ERROR_LOGS_PER_CONNECTION = 3  # further errors of one connection are counted, not logged
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "selfforcing.serve")


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8"))


def request_token(headers, query) -> str | None:
    """The token a request carries: ``Authorization: Bearer T``, else ``X-Token: T``, else ``?token=T`` in the URL
    (kept for old clients; the URL ends up in access logs, where it is redacted). None when it has none."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if headers.get("x-token", "").strip():
        return headers["x-token"].strip()
    return query.get("token")


class RedactingFilter(logging.Filter):
    """Makes a log record safe to write: the token (as sent, and URL-encoded) and the value of every ``token=``
    URL parameter become ``[redacted]`` in the message, its arguments and its traceback text; and a traceback a
    client causes on purpose (an invalid UTF-8 frame, which uvicorn logs at ERROR) becomes one WARNING line."""

    _QUERY = re.compile(r"([?&]token=)[^&\s\"']*")

    def __init__(self, token: str | None) -> None:
        super().__init__()
        from urllib.parse import quote, quote_plus

        self.secrets = sorted({t for t in (token, token and quote(token, safe=""), token and quote_plus(token)) if t},
                              key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "[redacted]")
        return self._QUERY.sub(r"\1[redacted]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UnicodeDecodeError):
            record.msg = f"{record.msg} (closed the connection)"
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self.redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def install_log_filter(log_filter: logging.Filter) -> None:
    """Put ``log_filter`` on the server's loggers and on every handler they or the root logger write through, so
    records of child loggers (which skip their parents' logger filters) pass it too."""
    loggers = [logging.getLogger(name) for name in SERVER_LOGGERS] + [logging.getLogger()]
    for logger in loggers:
        logger.addFilter(log_filter)
        for handler in logger.handlers:
            handler.addFilter(log_filter)


class ConnectionLog:
    """Error logging of one connection: one line per error (the traceback only at DEBUG), at most
    ``MAX_ERROR_LOGS_PER_CONNECTION`` lines, so one client cannot flood the log."""

    def __init__(self, name: str) -> None:
        self.name, self.logged, self.dropped = name, 0, 0

    def error(self, what: str, err: BaseException) -> None:
        if self.logged >= MAX_ERROR_LOGS_PER_CONNECTION:
            self.dropped += 1
            return
        self.logged += 1
        log.error("%s %s: %s: %s", self.name, what, type(err).__name__, str(err)[:300])
        log.debug("%s %s", self.name, what, exc_info=err)

    def close(self) -> None:
        if self.dropped:
            log.error("%s: %d more errors not logged", self.name, self.dropped)


def create_app(checkpoint=None, *, host: ModelHost | None = None, token: str | None = None, max_sessions: int = 4,
               max_prompt_chars: int = MAX_PROMPT_CHARS, window_frames: int | None = None,
               sink_frames: int | None = None, torch_threads: int | None = None, preset: str = "tiny",
               idle_timeout_s: float = 300.0, auth_timeout_s: float = AUTH_TIMEOUT_S,
               max_pending_auth: int | None = None) -> FastAPI:
    """The server for ``checkpoint`` (a shipped model name, a folder or a file; None: the default model), or for an
    already loaded ``host``. ``token``: a bearer token every client must present (None: no authentication);
    ``auth_timeout_s``: how long a WebSocket may wait before sending it; ``max_pending_auth``: WebSockets waiting
    to authenticate at once (default 4 per session slot, at least 16; more are refused as busy)."""
    owns_host = host is None
    if host is None:
        host = ModelHost(checkpoint, preset=preset, window_frames=window_frames, sink_frames=sink_frames,
                         max_sessions=max_sessions, torch_threads=torch_threads)
    token = token or None

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        if owns_host:  # a host passed in may serve other apps too
            host.close()

    docs = {} if token is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="selfforcing", summary="Self Forcing streaming video server", lifespan=lifespan, **docs)
    app.state.host = host
    app.state.log_filter = RedactingFilter(token)
    install_log_filter(app.state.log_filter)
    _add_error_handlers(app)
    _add_http_routes(app, host, token, max_prompt_chars)
    stream = StreamEndpoint(host, token, max_prompt_chars, idle_timeout_s, auth_timeout_s,
                            max_pending_auth or max(16, 4 * host.max_sessions))
    app.websocket("/ws/stream")(stream.serve)
    return app


def _error_response(status: int, error: str, detail) -> JSONResponse:
    return JSONResponse({"type": "error", "error": error, "detail": detail}, status_code=status)


def _add_error_handlers(app: FastAPI) -> None:
    """HTTP errors as the protocol's error messages: ``{"type": "error", "error": ..., "detail": ...}``."""

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        error = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 503: "busy"}.get(
            exc.status_code, "bad_request")
        return _error_response(exc.status_code, error, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        detail = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()[:5])
        return _error_response(422, "invalid_request", detail)


def _add_http_routes(app: FastAPI, host: ModelHost, token: str | None, max_prompt_chars: int) -> None:
    """``/`` (the web page), ``/health``, and, behind the token, ``/models`` and ``POST /generate``."""

    def require_token(request: Request) -> None:
        if token is None:
            return
        if not _same(request_token(request.headers, request.query_params), token):
            raise HTTPException(401, "send the header 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "sessions": host.active, "max_sessions": host.max_sessions,
                "frames_served": host.frames_served, "uptime_s": round(time.time() - host.started, 1),
                "auth": token is not None}

    @app.get("/models", dependencies=[Depends(require_token)])
    async def models():
        return {"models": [host.describe()], "max_prompt_chars": max_prompt_chars}

    @app.post("/generate", dependencies=[Depends(require_token)],
              responses={200: {"content": {"video/mp4": {}}, "description": "an H.264 mp4"}})
    async def generate(req: GenerateRequest):
        if len(req.prompt) > max_prompt_chars:
            msg = f"prompt has {len(req.prompt)} characters; the limit is {max_prompt_chars}"
            raise RequestValidationError([{"loc": ("body", "prompt"), "msg": msg}])
        try:
            sid = host.acquire("generate")
        except Busy as err:
            raise HTTPException(503, str(err)) from None
        try:
            data = await host.run(_render_mp4, host, req)
        finally:
            host.release(sid)
        return Response(data, media_type="video/mp4",
                        headers={"Content-Disposition": 'attachment; filename="selfforcing.mp4"'})


class StreamEndpoint:
    """``/ws/stream``: admits a client (its token checked before it takes a session slot), then runs its session
    until it disconnects, stays idle ``idle_timeout_s`` or fails. ``max_pending_auth``: clients that may wait to
    send their token at once."""

    def __init__(self, host: ModelHost, token: str | None, max_prompt_chars: int, idle_timeout_s: float,
                 auth_timeout_s: float, max_pending_auth: int) -> None:
        self.host, self.token, self.max_prompt_chars = host, token, max_prompt_chars
        self.idle_timeout_s, self.auth_timeout_s = idle_timeout_s, auth_timeout_s
        self.pending_auth, self.max_pending_auth = 0, max_pending_auth

    async def serve(self, ws: WebSocket):
        await ws.accept()
        admitted, first = await self.admit(ws)
        if not admitted:
            return
        try:
            sid = self.host.acquire("stream")
        except Busy as err:
            return await _refuse(ws, "busy", str(err), 1013)
        client = ws.client
        errors = ConnectionLog(f"session {sid} ({client.host}:{client.port})" if client else f"session {sid}")
        session = Session(self.host, sid, ws.send_text, ws.send_bytes)
        try:
            await self.run_session(ws, session, first)
        except (WebSocketDisconnect, ConnectionError):
            pass  # the client went away
        except RuntimeError as err:  # starlette's "not connected" after a close, or a failed start
            log.debug("session %s ended: %s", sid, err)
        except Exception as err:  # never let one client take the server down (nor flood its log)
            errors.error("failed", err)
        finally:
            await session.close()
            self.host.release(sid)
            errors.close()

    async def admit(self, ws: WebSocket):
        """``(admitted, first message)``: without a token, ``(True, None)``; with one, the token of the request's
        headers or URL, else of its first message (which is returned, to be handled). Refuses the connection
        when it returns ``(False, None)``."""
        if self.token is None:
            return True, None
        given = request_token(ws.headers, ws.query_params)
        if given is None:
            first = await self.authenticate_by_message(ws)
            return first is not None, first
        if not _same(given, self.token):
            await _refuse(ws, "unauthorized", "wrong token", 1008)
            return False, None
        return True, None

    async def authenticate_by_message(self, ws: WebSocket):
        """Wait (``auth_timeout_s`` at most, no session slot held) for a first message that carries the token: an
        auth message, or a start message with ``token``. Returns it, or None after refusing the connection."""
        if self.pending_auth >= self.max_pending_auth:
            await _refuse(ws, "busy", "too many connections are waiting to authenticate; try again", 1013)
            return None
        self.pending_auth += 1
        try:
            await ws.send_text(message("ready", session=None, auth_required=True, auth_timeout_s=self.auth_timeout_s,
                                       detail='send {"type": "auth", "token": ...} first'))
            event = await asyncio.wait_for(ws.receive(), self.auth_timeout_s)
        except asyncio.TimeoutError:
            await _refuse(ws, "unauthorized", f"no token within {self.auth_timeout_s:g} s", 1008)
            return None
        finally:
            self.pending_auth -= 1
        if event["type"] == "websocket.disconnect":
            return None
        try:
            msg = parse_client_message(event.get("text"), self.max_prompt_chars)
        except ProtocolError:
            msg = None
        if not isinstance(msg, (AuthMessage, StartMessage)) or not _same(msg.token, self.token):
            await _refuse(ws, "unauthorized", 'wrong or missing token: the first message must be {"type": "auth", '
                                              '"token": ...} (or a start message with "token")', 1008)
            return None
        return msg

    async def run_session(self, ws: WebSocket, session: Session, first) -> None:
        """Greet the client (or start the stream its first message asked for), then handle its messages."""
        host = self.host
        if not isinstance(first, StartMessage):
            await session.send("ready", session=session.sid, auth_required=False,
                               max_prompt_chars=self.max_prompt_chars, frame_size=list(host.frame_size()[::-1]),
                               fps=host.spec.fps, default_prompt=host.spec.default_prompt)
        else:
            await _handle(session, first)
        while True:
            timeout = None if session.streaming else self.idle_timeout_s
            try:
                event = await asyncio.wait_for(ws.receive(), timeout)
            except asyncio.TimeoutError:
                await _refuse(ws, "idle", f"no message for {self.idle_timeout_s:g} s", 1008)
                return
            if event["type"] == "websocket.disconnect":
                return
            try:
                msg = parse_client_message(event.get("text"), self.max_prompt_chars)
            except ProtocolError as err:
                await session.send("error", error=err.error, detail=err.detail)
                continue
            await _handle(session, msg)


async def _refuse(ws: WebSocket, error: str, detail: str, code: int) -> None:
    with contextlib.suppress(Exception):
        await ws.send_text(message("error", error=error, detail=detail))
        await ws.close(code=code, reason=error)


async def _handle(session: Session, msg) -> None:
    if isinstance(msg, AuthMessage):  # already admitted (or no token needed): nothing to do
        await session.send("ack", command="auth")
        return
    if isinstance(msg, StartMessage):
        await session.start(msg)
        return
    if not session.streaming:
        await session.send("error", error="not_streaming", detail=f"'{msg.type}' needs a running stream; send 'start'")
        return
    if isinstance(msg, PromptMessage):
        recache = session.switch(msg)
        await session.send("ack", command="prompt", prompt=msg.prompt, recache=recache)
    elif isinstance(msg, PauseMessage):
        session.pause()
        await session.send("ack", command="pause")
    elif isinstance(msg, ResumeMessage):
        session.resume()
        await session.send("ack", command="resume")
    elif isinstance(msg, StopMessage):
        await session.send("ack", command="stop")
        await session.stop()


def _render_mp4(host: ModelHost, req: GenerateRequest) -> bytes:
    """Worker thread: ``req.num_frames`` frames of a fresh stream, as mp4 bytes."""
    import torch

    from ..io import write_mp4

    gen = host.new_generator()
    gen.start(host.prompt_of(req), seed=req.seed)
    frames, count = [], 0
    while count < req.num_frames:
        chunk = gen.next_chunk().frames
        frames.append(chunk)
        count += chunk.shape[0]
    video = torch.cat(frames)[:req.num_frames]
    with tempfile.TemporaryDirectory(prefix="selfforcing-serve-") as tmp:
        path = write_mp4(os.path.join(tmp, "video.mp4"), video, fps=float(req.fps or host.spec.fps))
        with open(path, "rb") as fh:
            return fh.read()


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info", **kwargs):
    import uvicorn

    sessions = app.state.host.max_sessions
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, ws_max_size=WS_MAX_MESSAGE_BYTES,
                            ws_ping_interval=20.0, ws_ping_timeout=20.0, timeout_graceful_shutdown=5,
                            limit_concurrency=max(64, 8 * sessions), **kwargs)
    install_log_filter(app.state.log_filter)  # after uvicorn's logging setup, which makes new handlers
    return config


class ServerThread:
    """Run ``app`` on uvicorn in a background thread, on a free loopback port (tests, benchmarks).

        with ServerThread(create_app(folder, max_sessions=2)) as server:
            server.url  # http://127.0.0.1:PORT
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port, log_level))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="selfforcing-serve")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws/stream"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
