"""``fpn-serve``: serve model folders (or stores of them) over HTTP with uvicorn, and over gRPC beside it
(``--grpc-port``, 0 for none) on the same asyncio loop and models."""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import threading
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from . import __version__
from .batching.registry import ModelRegistry
from .contract.store import default_store
from .errors import FPNServeError
from .http.app import create_app, load_models
from .settings import Settings, get_settings


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
    defaults = get_settings()
    for name, info in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        kwargs: dict[str, Any] = {"help": f"{info.description} [env FPN_SERVE_{name.upper()}]", "dest": name}
        if name == "token":
            kwargs["help"] = "bearer token required on every route but health [env FPN_SERVE_TOKEN; prefer the env]"
            kwargs["default"] = None  # never printed by --help; FPN_SERVE_TOKEN applies when the flag is absent
        else:
            kwargs["default"] = default
            kwargs["type"] = type(default) if not isinstance(default, str) else str
        if name == "log_level":
            kwargs["choices"] = list(get_args(info.annotation))
        p.add_argument(flag, **kwargs)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        parser = get_args_parser()
    except ValidationError as exc:  # a bad FPN_SERVE_* variable
        problems = "; ".join(f"FPN_SERVE_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        print(f"fpn-serve: error: {problems}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        given = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
        if given["token"] is None:
            del given["token"]  # keep FPN_SERVE_TOKEN from the environment
        settings = Settings(**given)
    except ValidationError as exc:
        parser.error("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()))
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    try:
        paths = args.models or [default_store()]
        registry = load_models(settings, paths)  # fail fast, with one clear line, before uvicorn starts
    except FPNServeError as exc:
        print(f"fpn-serve: error: {exc}", file=sys.stderr)
        return 1
    app = create_app(settings, paths, registry)
    server = _uvicorn_server(settings, registry, app)
    server.run()
    return 1 if server.failed else 0


def _uvicorn_server(settings: Settings, registry: ModelRegistry, app: Any) -> Any:
    """uvicorn's server for ``app``, with the gRPC endpoint (unless ``settings.grpc_port`` is 0) on
    the same loop and registry: bound before the app starts, serving once the app's lifespan has
    started the schedulers, stopped before the lifespan stops them."""
    import uvicorn

    from .grpc import GrpcEndpoint

    class Server(uvicorn.Server):
        """On the first SIGTERM/SIGINT, readiness turns false; uvicorn's graceful exit follows after drain_s."""

        failed = False
        grpc: GrpcEndpoint | None = None

        async def startup(self, sockets: Any = None) -> None:
            if settings.grpc_port:
                try:
                    self.grpc = GrpcEndpoint(registry, settings)
                    self.grpc.bind()
                except FPNServeError as exc:
                    logging.getLogger("fpn_serve").error("%s", exc)
                    self.failed = self.should_exit = True
                    return
            await super().startup(sockets)
            if self.grpc is not None and self.started:
                await self.grpc.start()
            # what is loaded by now (modules, routes, models, schedulers) lives as long as the server:
            # the garbage collector need not walk it again, so its collections stay short under traffic
            gc.freeze()

        async def shutdown(self, sockets: Any = None) -> None:
            if self.grpc is not None:
                await self.grpc.stop()
            await super().shutdown(sockets)

        def handle_exit(self, sig: int, frame: Any) -> None:
            if registry.draining or settings.drain_s == 0:
                super().handle_exit(sig, frame)
                return
            registry.draining = True
            logging.getLogger("fpn_serve").info("draining for %.1f s before shutdown", settings.drain_s)
            threading.Timer(settings.drain_s, super().handle_exit, args=(sig, frame)).start()

    return Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level))


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
