"""The streaming protocol: pydantic models of every message a client may send, and the server's replies.

Client -> server (JSON text messages; extra fields are errors, types are strict):

    {"type": "auth", "token": "..."}                                    # first, when the server wants a token
    {"type": "start", "prompt": "...", "seed": 0, "num_frames": 48 | null, "fps": 8.0 | null,
     "format": "jpeg" | "png", "recache": false, "token": "..."}        # null num_frames: unbounded
    {"type": "prompt", "prompt": "...", "recache": true}                # switch the prompt mid-stream
    {"type": "pause"} | {"type": "resume"} | {"type": "stop"}

A prompt must hold text: an empty or whitespace-only prompt is an error, unless the message says
``"unconditional": true`` (and then the prompt must be empty or left out): the model's null prompt is used.

Server -> client: JSON text messages (:func:`message`), and after each ``chunk`` message exactly ``frames``
binary messages, one encoded image (JPEG or PNG) per frame, in order:

    {"type": "ready", "session": "...", "auth_required": false, ...}    # on admission
    {"type": "ready", "session": null, "auth_required": true}           # with a token and none sent yet
    {"type": "started", "prompt", "seed", "num_frames", "fps", "format", "width", "height"}
    {"type": "chunk", "index", "start_frame", "frames", "latency_s", "prompt", "width", "height", "format"}
    {"type": "ack", "command": "prompt" | "pause" | "resume" | "stop", ...}
    {"type": "done", "frames", "chunks"}                                # num_frames reached, or stopped
    {"type": "error", "error": "...", "detail": "..."}                  # the connection stays open
    {"type": "error", "error": "busy" | "unauthorized", ...} then close  # 1013 / 1008
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

MAX_PROMPT_CHARS = 500  # default cap on a prompt's length (the command line can change it)
MAX_FRAMES = 100_000  # a bounded stream may ask for at most this many frames
MAX_FPS = 120.0


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Prompted(_Message):
    """A message with a prompt: text, or explicitly none with ``unconditional``."""

    prompt: StrictStr = ""
    unconditional: StrictBool = False

    @model_validator(mode="after")
    def _prompt_or_unconditional(self):
        if self.unconditional and self.prompt.strip():
            raise ValueError("unconditional is true but a prompt is given: send one or the other")
        if not self.unconditional and not self.prompt.strip():
            raise ValueError('the prompt is empty: send a prompt, or "unconditional": true for a video without one')
        return self


class AuthMessage(_Message):
    type: Literal["auth"]
    token: StrictStr


class StartMessage(_Prompted):
    type: Literal["start"]
    seed: StrictInt = Field(default=0, ge=0, le=2**63 - 1)
    num_frames: StrictInt | None = Field(default=None, ge=1, le=MAX_FRAMES)
    fps: StrictFloat | StrictInt | None = Field(default=None, gt=0, le=MAX_FPS)
    format: Literal["jpeg", "png"] = "jpeg"
    recache: StrictBool = False  # default for prompt switches that do not say
    token: StrictStr | None = None  # the bearer token, when the server wants one and the URL has none


class PromptMessage(_Prompted):
    type: Literal["prompt"]
    recache: StrictBool | None = None  # None: the start message's choice


class PauseMessage(_Message):
    type: Literal["pause"]


class ResumeMessage(_Message):
    type: Literal["resume"]


class StopMessage(_Message):
    type: Literal["stop"]


ClientMessage = Annotated[AuthMessage | StartMessage | PromptMessage | PauseMessage | ResumeMessage | StopMessage,
                          Field(discriminator="type")]
_ADAPTER = TypeAdapter(ClientMessage)


class GenerateRequest(_Prompted):
    """``POST /generate``: one bounded video as an mp4."""

    num_frames: StrictInt = Field(default=24, ge=1, le=1024)
    seed: StrictInt = Field(default=0, ge=0, le=2**63 - 1)
    fps: StrictFloat | StrictInt | None = Field(default=None, gt=0, le=MAX_FPS)


class ProtocolError(ValueError):
    """A client message that cannot be obeyed; ``error`` is a short code, ``detail`` the explanation."""

    def __init__(self, error: str, detail: str = "") -> None:
        super().__init__(f"{error}: {detail}" if detail else error)
        self.error, self.detail = error, detail


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc or 'message'}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def parse_client_message(text: str | bytes | None, max_prompt_chars: int = MAX_PROMPT_CHARS):
    """One client message, validated -> a message model; raises :class:`ProtocolError` when it is not one."""
    if text is None:
        raise ProtocolError("bad_message", "binary messages are not accepted; send JSON text")
    if isinstance(text, (bytes, bytearray)):
        raise ProtocolError("bad_message", "binary messages are not accepted; send JSON text")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ProtocolError("bad_json", f"not valid JSON ({str(err)[:120]})") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", f"a message is a JSON object, got {type(data).__name__}")
    if "type" not in data:
        raise ProtocolError("bad_message", "a message needs a 'type' (auth, start, prompt, pause, resume, stop)")
    prompt = data.get("prompt")
    if isinstance(prompt, str) and len(prompt) > max_prompt_chars:
        raise ProtocolError("prompt_too_long", f"prompt has {len(prompt)} characters; the limit is {max_prompt_chars}")
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as err:
        raise ProtocolError("invalid_message", _describe(err)) from None


def message(type_: str, **fields) -> str:
    """A server message as JSON text."""
    return json.dumps({"type": type_, **fields}, allow_nan=False)
