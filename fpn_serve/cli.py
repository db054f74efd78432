"""``fpn-serve``: serve model folders (or stores of them) over HTTP with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .app import ServerConfig, create_app, load_registry
from .engine import DEVICES
from .errors import FPNServeError
from .store import default_store


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fpn-serve",
        description="Serve Fixed Point Network classifiers: POST /classify?tol=T&max_iter=K[&model=NAME] "
        "with an image (multipart field 'file', or a raw image/png or image/jpeg body) or JSON "
        '{"inputs": [...]}. GET /models lists the models, GET /healthz answers when ready, '
        "GET /docs shows the OpenAPI documentation.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument(
        "models",
        nargs="*",
        type=Path,
        help="model folders (each with manifest.json) or stores holding model folders; "
        "default: the shipped MNIST model",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto: CUDA when it really initialises, else CPU")
    p.add_argument("--max-iter-cap", type=int, default=1000, help="largest max_iter a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body")
    p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest image (width x height) decoded")
    p.add_argument("--max-inputs", type=int, default=256, help="most inputs (images or JSON inputs) per request")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="log verbosity"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0..65535, got {args.port}")
    for flag in ("max_iter_cap", "max_body_bytes", "max_pixels", "max_inputs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        paths = args.models or [default_store()]
        config = ServerConfig(
            model_paths=tuple(paths),
            device=args.device,
            max_iter_cap=args.max_iter_cap,
            max_body_bytes=args.max_body_bytes,
            max_pixels=args.max_pixels,
            max_inputs=args.max_inputs,
        )
        registry = load_registry(config)  # fail fast, with one clear line, before uvicorn starts
    except FPNServeError as exc:
        print(f"fpn-serve: error: {exc}", file=sys.stderr)
        return 1
    import uvicorn

    uvicorn.run(create_app(config, registry), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
