"""``protopnet serve``: look at a model's reasoning on your own pictures, and correct it, in a browser.

Needs the ``serve`` extra (``pip install 'protopnet[serve]'``: Starlette, uvicorn, python-multipart,
Jinja2). The pieces:

* :mod:`protopnet.serve.session`: :class:`ModelSession`, the served model and what is asked of it
  (explain, gallery, edit, save), free of any web framework;
* :mod:`protopnet.serve.uploads`: request limits and picture decoding;
* :mod:`protopnet.serve.app`: the ASGI application (pages and JSON API).

    >>> from protopnet.serve import create_app, session_for
    >>> app = create_app(session_for("demo-out/model", data="synthetic"))
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)

See docs/serve.md.
"""

from __future__ import annotations

from .session import Draft, ModelSession
from .uploads import RequestError, UploadLimits, decode_picture, display_name

__all__ = ["Draft", "ModelSession", "RequestError", "ServeApp", "UploadLimits", "create_app", "decode_picture", "display_name", "session_for"]


def __getattr__(name: str):  # the web stack is imported only when the app is asked for
    if name in ("ServeApp", "create_app", "session_for"):
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
