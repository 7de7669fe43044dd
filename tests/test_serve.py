"""The streaming server (`selfforcing serve`): a real uvicorn server on a loopback port, real WebSocket clients.

One tiny random-weight checkpoint and one loaded model serve every test (max 2 sessions); the token tests run a
second app over the same loaded model. The browser test drives Debian's chromium with Playwright and is skipped
when no chromium binary is installed.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
websockets = pytest.importorskip("websockets")

from selfforcing.serve import ServerThread, create_app  # noqa: E402
from selfforcing.serve.sessions import ModelHost  # noqa: E402

PROMPT_A = "the digit 3 moves right"
PROMPT_B = "the digit 8 moves left"


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from selfforcing.models import CausalWanModel

    folder = tmp_path_factory.mktemp("serve") / "tiny"
    CausalWanModel.from_preset("tiny").save_pretrained(folder)
    h = ModelHost(str(folder), max_sessions=2, window_frames=6, sink_frames=3)
    yield h
    h.close()


@pytest.fixture(scope="module")
def server(host):
    with ServerThread(create_app(host=host)) as srv:
        yield srv


def get(url: str, headers: dict | None = None):
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


def post_json(url: str, body, headers: dict | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, resp.headers.get("content-type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


def health(server) -> dict:
    status, _, body = get(server.url + "/health")
    assert status == 200
    return json.loads(body)


def wait_sessions(server, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while health(server)["sessions"] != n:
        assert time.monotonic() < deadline, f"sessions never became {n}: {health(server)}"
        time.sleep(0.05)


async def recv_json(ws, timeout: float = 30.0) -> dict:
    """The next JSON message, skipping binary frames."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        if isinstance(msg, str):
            return json.loads(msg)


async def next_chunk(ws, timeout: float = 30.0) -> tuple[dict, list[bytes]]:
    """The next chunk header and its frames."""
    while True:
        msg = await recv_json(ws, timeout)
        if msg["type"] == "chunk":
            frames = []
            while len(frames) < msg["frames"]:
                data = await asyncio.wait_for(ws.recv(), timeout)
                assert isinstance(data, bytes), f"expected a frame, got {data!r}"
                frames.append(data)
            return msg, frames


async def open_session(server, **query):
    url = server.ws_url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    ws = await websockets.connect(url, max_size=2**22)
    return ws, await recv_json(ws)


def start_msg(prompt=PROMPT_A, **kw) -> str:
    return json.dumps({"type": "start", "prompt": prompt, "seed": 0, "num_frames": None, "fps": None,
                       "format": "jpeg", **kw})


# ------------------------------------------------------------------------------------------------ REST
def test_health_models_page(server):
    h = health(server)
    assert h["status"] == "ok" and h["max_sessions"] == 2 and h["sessions"] == 0
    status, _, body = get(server.url + "/models")
    model = json.loads(body)["models"][0]
    assert status == 200 and model["window_frames"] == 6 and model["sink_frames"] == 3
    assert model["spec"]["latent_size"] == [16, 16] and model["frame_size"] == [64, 64]
    status, ctype, body = get(server.url + "/")
    assert status == 200 and ctype.startswith("text/html") and b"<canvas" in body and b"/ws/stream" in body


def test_generate_returns_mp4(server, tmp_path):
    import av

    status, ctype, body = post_json(server.url + "/generate", {"prompt": PROMPT_A, "num_frames": 7, "seed": 1})
    assert status == 200 and ctype == "video/mp4", body[:300]
    path = tmp_path / "out.mp4"
    path.write_bytes(body)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 7 and frames[0].shape == (64, 64, 3)
    # wrong bodies: an unknown field, a wrong type, a prompt over the cap, not JSON
    for bad in ({"prompt": PROMPT_A, "extra": 1}, {"prompt": PROMPT_A, "num_frames": "7"},
                {"prompt": "x" * 501}, b"{not json"):
        status, _, body = post_json(server.url + "/generate", bad)
        assert status == 422 and json.loads(body)["type"] == "error", body
    assert health(server)["sessions"] == 0


# ------------------------------------------------------------------------------------------------ hostile clients
def hostile_messages() -> list:
    """100 messages that must each be answered with an error (text, or bytes for binary messages)."""
    m: list = [
        "", " ", "{", "}", "[", "nul", "{'type': 'start'}", '{"type": "start",}', "\x00\x01", "\u00ff\u00fe not json",
        "null", "true", "1", "3.5", '"start"', "[]", '[{"type": "start"}]', "{}", '{"prompt": "x"}',
        '{"type": null}', '{"type": 1}', '{"type": "START"}', '{"type": "launch"}', '{"type": ["start"]}',
        "[" * 5000 + "]" * 5000, '{"a":' * 3000 + "1" + "}" * 3000,
        b"\x89PNG binary", b"", b'{"type": "start", "prompt": "binary"}',
    ]
    # out of order: controls before any stream
    m += [json.dumps(x) for x in ({"type": "prompt", "prompt": PROMPT_B}, {"type": "prompt", "prompt": PROMPT_B,
                                   "recache": True}, {"type": "pause"}, {"type": "resume"}, {"type": "stop"})]
    good = {"type": "start", "prompt": PROMPT_A, "seed": 0, "num_frames": 6, "fps": 8, "format": "jpeg"}
    wrong = [  # (field, value) that break an otherwise valid start
        ("prompt", None), ("prompt", 3), ("prompt", ""), ("prompt", ["a"]), ("prompt", {"text": "a"}),
        ("prompt", "x" * 501), ("prompt", "y" * 100_000), ("seed", "0"), ("seed", -1), ("seed", 1.5),
        ("seed", True), ("seed", 2**64), ("seed", None), ("seed", [0]), ("num_frames", 0), ("num_frames", -5),
        ("num_frames", "10"), ("num_frames", 2.5), ("num_frames", 10**9), ("num_frames", False),
        ("fps", 0), ("fps", -1), ("fps", "8"), ("fps", 1e9), ("fps", True), ("fps", [8]),
        ("format", "gif"), ("format", "JPEG"), ("format", None), ("format", 1), ("recache", "yes"),
        ("recache", 1), ("recache", None), ("token", 5),
    ]
    m += [json.dumps({**good, k: v}) for k, v in wrong]
    m += [json.dumps({**good, "extra": 1}), json.dumps({**good, "Prompt": "x"}), json.dumps({**good, "": 0}),
          json.dumps({"type": "pause", "now": True}), json.dumps({"type": "stop", "force": 1}),
          json.dumps({"type": "resume", "x": None}), json.dumps({"type": "start"}),
          json.dumps({k: v for k, v in good.items() if k != "prompt"}),
          '{"type": "start", "prompt": "a", "fps": NaN}', '{"type": "start", "prompt": "a", "fps": Infinity}',
          '{"type": "start", "prompt": "a", "seed": 1' + "0" * 5000 + "}",
          '{"type": "start", "prompt": "a", "seed": 1e400}',
          json.dumps({"type": "prompt", "prompt": 7}), json.dumps({"type": "prompt"}),
          json.dumps({"type": "prompt", "prompt": "z" * 1000})]
    i = 0
    while len(m) < 100:  # fill with random-ish garbage of every kind
        i += 1
        m.append(["{" * i, json.dumps({"type": "start", "prompt": "a", f"field{i}": i}),
                  json.dumps({"type": "prompt", "prompt": "a", "recache": str(i)}),
                  json.dumps({"type": "start", "prompt": "a", "num_frames": -i}), "x" * i][i % 5])
    return m[:100]


def test_hostile_messages_each_get_an_error(server):
    messages = hostile_messages()
    assert len(messages) == 100

    async def run():
        ws, ready = await open_session(server)
        assert ready["type"] == "ready"
        async with ws:
            for i, bad in enumerate(messages):
                await ws.send(bad)
                reply = await recv_json(ws, timeout=15)
                assert reply["type"] == "error" and reply["error"], (i, bad[:80] if bad else bad, reply)
            assert health(server)["status"] == "ok"
            # the connection still works after all that
            await ws.send(start_msg(num_frames=4))
            assert (await recv_json(ws))["type"] == "started"
            total = 0
            while total < 4:
                header, frames = await next_chunk(ws)
                total += len(frames)
            assert total == 4 and (await recv_json(ws))["type"] == "done"
        # a message over the size limit closes that connection (1009), and only that one
        ws, _ = await open_session(server)
        await ws.send(json.dumps({"type": "start", "prompt": "x" * (2 << 20)}))
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(ws, timeout=15)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009

    asyncio.run(run())
    wait_sessions(server, 0)
    assert health(server)["status"] == "ok"


# ------------------------------------------------------------------------------------------------ sessions
def test_session_cap_busy_while_two_stream(server):
    async def run():
        a, _ = await open_session(server)
        b, _ = await open_session(server)
        await a.send(start_msg(seed=1))
        await b.send(start_msg(PROMPT_B, seed=2))
        await next_chunk(a)
        await next_chunk(b)
        c = await websockets.connect(server.ws_url)
        reply = await recv_json(c)
        assert reply["type"] == "error" and reply["error"] == "busy" and "2 sessions" in reply["detail"]
        with pytest.raises(websockets.ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd.code == 1013
        assert health(server)["sessions"] == 2
        for ws in (a, b):  # both keep streaming
            h1, f1 = await next_chunk(ws)
            h2, f2 = await next_chunk(ws)
            assert h2["index"] == h1["index"] + 1 and len(f1) == len(f2) == 3
        await a.close()
        await b.close()

    asyncio.run(run())
    wait_sessions(server, 0)


def test_prompt_switch_pause_resume_stop(server):
    from PIL import Image

    async def run():
        ws, _ = await open_session(server)
        async with ws:
            await ws.send(start_msg(fps=30, format="png"))
            started = await recv_json(ws)
            assert started["type"] == "started" and started["fps"] == 30.0
            header, frames = await next_chunk(ws)
            assert header["prompt"] == PROMPT_A and header["latency_s"] > 0
            img = Image.open(io.BytesIO(frames[0]))
            assert img.format == "PNG" and img.size == (64, 64)
            await ws.send(json.dumps({"type": "prompt", "prompt": PROMPT_B, "recache": True}))
            for _ in range(4):  # the switch lands on the next chunk not yet begun
                header, _ = await next_chunk(ws)
                if header["prompt"] == PROMPT_B:
                    break
            assert header["prompt"] == PROMPT_B
            await ws.send(json.dumps({"type": "pause"}))
            while True:  # a chunk already being made may still come
                msg = await recv_json(ws)
                if msg["type"] == "ack":
                    assert msg["command"] == "pause"
                    break
            with pytest.raises(asyncio.TimeoutError):  # at most the in-flight chunk, then silence
                for _ in range(2):
                    await next_chunk(ws, timeout=1.0)
            await ws.send(json.dumps({"type": "resume"}))
            assert (await recv_json(ws)) == {"type": "ack", "command": "resume"}
            header, _ = await next_chunk(ws)
            assert header["prompt"] == PROMPT_B
            await ws.send(json.dumps({"type": "stop"}))
            seen = []
            while not seen or seen[-1]["type"] != "done":
                seen.append(await recv_json(ws))
            assert {"type": "ack", "command": "stop"} in seen and seen[-1]["reason"] == "stopped"
            await ws.send(json.dumps({"type": "pause"}))  # nothing is streaming any more
            assert (await recv_json(ws))["error"] == "not_streaming"

    asyncio.run(run())
    wait_sessions(server, 0)


def test_disconnect_frees_session(server):
    async def run():
        a, _ = await open_session(server)
        b, _ = await open_session(server)
        await a.send(start_msg())
        await b.send(start_msg())
        await next_chunk(a)
        await next_chunk(b)
        a.transport.abort()  # vanish mid-stream without a close handshake
        await asyncio.to_thread(wait_sessions, server, 1)
        c, ready = await open_session(server)  # the freed slot is usable
        assert ready["type"] == "ready"
        await next_chunk(b)
        await b.close()
        await c.close()

    asyncio.run(run())
    wait_sessions(server, 0)


# ------------------------------------------------------------------------------------------------ token
def test_token(host):
    token = "s3cret-token"

    async def run(srv):
        ws = await websockets.connect(srv.ws_url + "?token=wrong")
        assert (await recv_json(ws))["error"] == "unauthorized"
        ws, ready = await open_session(srv, token=token)
        assert ready["type"] == "ready" and not ready["auth_required"]
        await ws.close()
        ws, ready = await open_session(srv)  # the token in the first message
        assert ready["auth_required"]
        await ws.send(start_msg(num_frames=1, token=token))
        assert (await recv_json(ws))["type"] == "started"
        await ws.close()
        ws, _ = await open_session(srv)
        await ws.send(json.dumps({"type": "pause"}))
        assert (await recv_json(ws))["error"] == "unauthorized"
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd.code == 1008

    with ServerThread(create_app(host=host, token=token)) as srv:
        assert get(srv.url + "/health")[0] == 200
        assert get(srv.url + "/models")[0] == 401
        assert get(srv.url + "/models", {"Authorization": "Bearer nope"})[0] == 401
        assert get(srv.url + "/models", {"Authorization": f"Bearer {token}"})[0] == 200
        assert post_json(srv.url + "/generate", {"prompt": "a", "num_frames": 1})[0] == 401
        asyncio.run(run(srv))
        wait_sessions(srv, 0)


def test_token_holders_are_never_locked_out_and_the_token_never_logged(host, capfd):
    """Clients without a token fill more than --max-sessions and idle: they take no session slot, are closed after
    the auth timeout, and a token holder (header, X-Token, first message, or the old URL way) gets a session within
    a second. No log line of the run (uvicorn's access and error logs at INFO included) holds the token; an invalid
    UTF-8 frame is one WARNING line, not a traceback; the API docs are off."""
    from websockets.frames import Frame, Opcode

    token = "Tok3n-s3cret/+="  # characters that URL-encoding changes

    async def admitted_within(connect_kwargs, url_suffix="", first=None) -> float:
        t0 = time.monotonic()
        ws = await websockets.connect(srv.ws_url + url_suffix, **connect_kwargs)
        if first is not None:
            assert (await recv_json(ws))["auth_required"]  # not admitted yet
            await ws.send(json.dumps(first))
        ready = await recv_json(ws)
        elapsed = time.monotonic() - t0
        assert ready["type"] == "ready" and ready["session"] and not ready["auth_required"], ready
        return ws, elapsed

    async def run():
        idle = []
        for _ in range(5):  # more than max_sessions (2), none with a token, none sending anything
            ws = await websockets.connect(srv.ws_url)
            assert (await recv_json(ws)) == {"type": "ready", "session": None, "auth_required": True,
                                             "auth_timeout_s": 1.5, "detail": 'send {"type": "auth", "token": ...} first'}
            idle.append(ws)
        assert health(srv)["sessions"] == 0
        a, t_a = await admitted_within({"additional_headers": {"Authorization": f"Bearer {token}"}})
        b, t_b = await admitted_within({}, first={"type": "auth", "token": token})
        assert t_a < 1.0 and t_b < 1.0 and health(srv)["sessions"] == 2
        await b.send(start_msg(num_frames=1, prompt="   "))  # a blank prompt is an error, the connection stays
        reply = await recv_json(b)
        assert reply["error"] == "invalid_message" and "prompt is empty" in reply["detail"]
        await b.send(start_msg(num_frames=1, prompt="", unconditional=True))
        assert (await recv_json(b))["type"] == "started"
        await a.close()
        await b.close()
        await asyncio.to_thread(wait_sessions, srv, 0)
        c, t_c = await admitted_within({"additional_headers": {"X-Token": token}})
        d, t_d = await admitted_within({}, url_suffix="?token=" + urllib.parse.quote(token, safe=""))
        assert t_c < 1.0 and t_d < 1.0
        await d.close()
        c.protocol.send_frame(Frame(Opcode.TEXT, b"\xff\xfe not utf-8"))  # uvicorn logs this one itself
        c.send_data()
        with pytest.raises(websockets.ConnectionClosed) as info:
            await recv_json(c, timeout=10)
        assert info.value.rcvd.code == 1007
        wrong = await websockets.connect(srv.ws_url, additional_headers={"Authorization": "Bearer nope"})
        assert (await recv_json(wrong))["error"] == "unauthorized"
        for ws in idle:  # dropped once the auth timeout passes
            assert (await recv_json(ws, timeout=10))["error"] == "unauthorized"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1008

    import urllib.parse

    with ServerThread(create_app(host=host, token=token, auth_timeout_s=1.5), log_level="info") as srv:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert get(srv.url + path)[0] == 404
        assert get(srv.url + "/models?token=" + urllib.parse.quote(token, safe=""))[0] == 200
        assert post_json(srv.url + "/generate", {"prompt": " ", "num_frames": 1},
                         {"Authorization": f"Bearer {token}"})[0] == 422
        asyncio.run(run())
        wait_sessions(srv, 0)
    out = capfd.readouterr()
    logged = out.out + out.err
    assert '"WebSocket /ws/stream?token=[redacted]" [accepted]' in logged  # the URL way was logged, redacted
    assert "GET /models?token=[redacted]" in logged
    assert "Invalid UTF-8 sequence received from client. (closed the connection)" in logged
    for secret in (token, urllib.parse.quote(token, safe=""), urllib.parse.quote_plus(token)):
        assert secret not in logged
    assert "Traceback" not in logged


def test_connection_error_log_is_capped(caplog):
    from selfforcing.serve.app import MAX_ERROR_LOGS_PER_CONNECTION, ConnectionLog

    conn = ConnectionLog("session x")
    with caplog.at_level("ERROR", logger="selfforcing.serve"):
        for i in range(10):
            conn.error("failed", ValueError(f"bad {i}"))
        conn.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[:MAX_ERROR_LOGS_PER_CONNECTION] == [f"session x failed: ValueError: bad {i}"
                                                     for i in range(MAX_ERROR_LOGS_PER_CONNECTION)]
    assert lines[MAX_ERROR_LOGS_PER_CONNECTION:] == [f"session x: {10 - MAX_ERROR_LOGS_PER_CONNECTION} more errors not logged"]
    assert all(r.exc_info is None for r in caplog.records)


def test_cli_registers_serve():
    from selfforcing.cli import build_parser

    args = build_parser("serve").parse_args(["serve", "--checkpoint", "x", "--port", "9000", "--max-sessions", "3",
                                             "--token", "t"])
    assert (args.command, args.host, args.port, args.max_sessions, args.token) == ("serve", "127.0.0.1", 9000, 3, "t")


def test_serve_refuses_checkpoints_it_cannot_stream(tmp_path, capsys):
    """A missing checkpoint or a teacher (bidirectional, many-step) checkpoint: one line naming the problem, exit 2,
    no server started."""
    from selfforcing.cli import main
    from selfforcing.models import CausalWanModel
    from selfforcing.pipeline import PipelineSpec

    teacher = tmp_path / "teacher"
    CausalWanModel.from_preset("tiny", num_layers=1).save_pretrained(teacher)
    PipelineSpec(method="teacher", sampler="bidirectional", text_len=16).save(teacher)
    assert main(["serve", "--checkpoint", str(teacher), "--port", "0"]) == 2
    assert "is a bidirectional model" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_browser_plays_the_stream(server):
    path = _chromium()
    if path is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium); the browser test needs one")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("window.sfState && window.sfState.status.startsWith('ready')", timeout=20_000)
            page.fill("#fps-in", "30")
            page.click("#start")
            page.wait_for_function("window.sfState.framesDrawn >= 4", timeout=30_000)
            pixels = page.evaluate("""() => {
                const c = document.getElementById('screen');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let sum = 0, alpha = 0, min = 255, max = 0;
                for (let i = 0; i < d.length; i += 4) {
                    const v = d[i] + d[i + 1] + d[i + 2]; sum += v; alpha += d[i + 3];
                    min = Math.min(min, d[i]); max = Math.max(max, d[i]);
                }
                return {w: c.width, h: c.height, mean: sum / (d.length / 4) / 3, alpha: alpha / (d.length / 4), min, max};
            }""")
            assert pixels["w"] == 64 and pixels["h"] == 64 and pixels["alpha"] == 255, pixels
            assert pixels["max"] > pixels["min"], f"the canvas is flat: {pixels}"
            page.fill("#next-prompt", PROMPT_B)
            page.click("#switch")
            page.wait_for_function(f"window.sfState.lastPrompt === {json.dumps(PROMPT_B)}", timeout=30_000)
            stats = page.evaluate("() => ({fps: document.getElementById('fps').textContent,"
                                  " latency: document.getElementById('latency').textContent})")
            assert stats["latency"] != "-", stats
            page.click("#stop")
            page.wait_for_function("window.sfState.status.startsWith('done')", timeout=30_000)
            assert not errors, errors
            assert page.evaluate("window.sfState.errors") == []
        finally:
            browser.close()
    wait_sessions(server, 0)


def test_browser_page_sends_the_token_in_a_message_not_the_url(host, capfd):
    """The page opened as /?token=T takes the token out of its address bar and sends it as the WebSocket's first
    message: the stream plays, and the WebSocket URL the server saw (and logged) has no token."""
    path = _chromium()
    if path is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium); the browser test needs one")
    sync_api = pytest.importorskip("playwright.sync_api")
    token = "page-t0ken"
    with ServerThread(create_app(host=host, token=token), log_level="info") as srv, \
            sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(srv.url + f"/?token={token}")
            page.wait_for_function("window.sfState && window.sfState.status.startsWith('ready: session')",
                                   timeout=20_000)
            assert token not in page.url
            page.click("#start")
            page.wait_for_function("window.sfState.framesDrawn >= 2", timeout=30_000)
            page.click("#stop")
            page.wait_for_function("window.sfState.status.startsWith('done')", timeout=30_000)
        finally:
            browser.close()
        wait_sessions(srv, 0)
    logged = "".join(capfd.readouterr())
    assert '"WebSocket /ws/stream" [accepted]' in logged and token not in logged
