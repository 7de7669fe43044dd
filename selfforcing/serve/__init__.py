"""The streaming server: FastAPI + WebSocket, and a web page that plays the stream as it is made.

``selfforcing serve --checkpoint DIR`` runs it; :func:`create_app` builds the app, :class:`ServerThread` runs it in
a background thread. The protocol is in :mod:`selfforcing.serve.protocol`.
"""

from .app import ServerThread, create_app
from .sessions import ModelHost

__all__ = ["ModelHost", "ServerThread", "create_app"]
