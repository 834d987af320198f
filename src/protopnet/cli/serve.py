"""``protopnet serve``: a local web app (and JSON API) to explain pictures, browse the prototypes
and edit them. Needs ``pip install 'protopnet[serve]'``."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
from typing import Any

from .common import DATA_HELP, CommandError, add_parser

logger = logging.getLogger(__name__)

TOKEN_ENV = "PROTOPNET_SERVE_TOKEN"


def create_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = add_parser(
        subparsers,
        "serve",
        help="Look at the model's reasoning on your own pictures, browse and edit its prototypes, in a browser (and a JSON API)",
        example="protopnet serve demo-out/model --data synthetic --port 8000",
    )
    parser.add_argument("model", metavar="MODEL_DIR", help="a model (or ensemble) directory")
    parser.add_argument("--data", help=f"training data: enables editing and the nearest patches in the gallery ({DATA_HELP})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--out", metavar="DIR", help="where edited models are saved (default: next to MODEL_DIR)")
    parser.add_argument("--token", help=f"the token edits need (default: ${TOKEN_ENV}, else a new random one printed at start-up)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest request, in megabytes (default 20)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest picture, width x height (default 40 million)")
    parser.add_argument("--root-path", default="", help="the URL prefix when served behind a reverse proxy (e.g. /protopnet)")
    parser.add_argument("--forwarded-allow-ips", default="127.0.0.1", help="proxies whose X-Forwarded-* headers are trusted (default 127.0.0.1)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N or mps")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (default 0: PyTorch's choice)")
    return parser


def execute(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..serve.app import create_app, session_for
        from ..serve.uploads import UploadLimits
    except ImportError as error:
        raise CommandError(f"protopnet serve needs the serve extra: pip install 'protopnet[serve]' ({error})") from None
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port {args.port}: expected 0..65535")
    if args.max_upload_mb <= 0 or args.max_pixels < 64:
        raise CommandError("--max-upload-mb must be > 0 and --max-pixels >= 64")
    if args.root_path and not args.root_path.startswith("/"):
        raise CommandError(f"--root-path {args.root_path!r}: expected a path starting with '/', e.g. /protopnet")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    token = args.token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(24)
    from ..checkpoint import CheckpointError

    try:
        session = session_for(args.model, args.data, device=args.device, out=args.out)
    except (CheckpointError, ValueError) as error:
        raise CommandError(str(error)) from None
    limits = UploadLimits(max_bytes=int(args.max_upload_mb * 1024 * 1024), max_pixels=args.max_pixels)
    app = create_app(session, token=token, limits=limits)
    if not _is_loopback(args.host):
        logger.warning("listening on %s: other computers can reach this server; explanations need no token, edits do", args.host)
    config = uvicorn.Config(app, host=args.host, port=args.port, root_path=args.root_path, access_log=False,
                            proxy_headers=True, forwarded_allow_ips=args.forwarded_allow_ips, log_level="warning")
    server = uvicorn.Server(config)
    original_startup = server.startup

    async def startup(sockets: Any = None) -> None:  # print the address once the port is bound
        await original_startup(sockets=sockets)
        for s in getattr(server, "servers", []):
            for sock in s.sockets:
                host, port = sock.getsockname()[:2]
                shown = args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1"
                url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}{args.root_path}/"
                print(f"protopnet serve: {session.name} at {url}", flush=True)
                print(f"  token (for edits): {token}", flush=True)
                if session.editable:
                    print(f"  edit: {url}edit?token={token}", flush=True)
                break
            break

    server.startup = startup  # type: ignore[method-assign]
    server.run()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
