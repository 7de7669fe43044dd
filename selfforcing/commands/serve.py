"""`selfforcing serve`: the streaming server and its web page (FastAPI + uvicorn, loopback by default)."""

from __future__ import annotations

import argparse
import os
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="a shipped model name, a save_pretrained folder or a checkpoint file (default: moving-digits)")
    p.add_argument("--preset", default="tiny", help="architecture of an original-format checkpoint file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-sessions", type=int, default=4,
                   help="concurrent streams (and /generate calls); one more gets a 'busy' error")
    p.add_argument("--token", default=os.environ.get("SELFFORCING_TOKEN"),
                   help="token clients must send, as 'Authorization: Bearer T' or a first message {\"type\": \"auth\", "
                        "\"token\": T} (default: $SELFFORCING_TOKEN; none: no authentication)")
    p.add_argument("--max-prompt-chars", type=int, default=500, help="longest prompt accepted")
    p.add_argument("--window-frames", type=int, default=None,
                   help="rolling KV window per session in latent frames (bounds its memory)")
    p.add_argument("--sink-frames", type=int, default=None, help="sink frames kept in the window")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the generation worker (default: all cores)")
    p.add_argument("--auth-timeout", type=float, default=5.0,
                   help="with --token: close a WebSocket that has not sent the token within this many seconds")
    p.add_argument("--idle-timeout", type=float, default=300.0,
                   help="close a WebSocket that streams nothing and sends nothing for this many seconds")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from selfforcing.serve.app import create_app, uvicorn_config

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.token:
        print(f"warning: listening on {args.host} without --token; anyone who reaches it can use the server",
              file=sys.stderr)
    try:
        app = create_app(args.checkpoint, token=args.token, max_sessions=args.max_sessions,
                         max_prompt_chars=args.max_prompt_chars, window_frames=args.window_frames,
                         sink_frames=args.sink_frames, torch_threads=args.threads, preset=args.preset,
                         idle_timeout_s=args.idle_timeout, auth_timeout_s=args.auth_timeout)
    except (FileNotFoundError, ValueError) as err:  # a missing, corrupt or non-streaming checkpoint: say which
        print(f"selfforcing serve: {err}", file=sys.stderr)
        return 2
    print(f"selfforcing serve: http://{args.host}:{args.port}/ (max {args.max_sessions} sessions)", file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, args.host, args.port, args.log_level)).run()
    return 0
