"""Finding model folders: a path is either one model folder (it has manifest.json) or a store of them."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError


def default_store() -> Path:
    """The shipped model store: inside the installed package, or ``models/`` of a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "models", here.parent / "models"):
        if candidate.is_dir() and any(candidate.glob("*/manifest.json")):
            return candidate
    raise ModelError("no shipped models found; pass a model folder or a store: fpn-serve models/NAME")


def discover(paths: list[Path]) -> list[Path]:
    """Expand each path into model folders; raise ModelError for a path that holds none."""
    found: list[Path] = []
    for path in paths:
        if (path / "manifest.json").is_file():
            found.append(path)
        elif path.is_dir():
            models = sorted(p.parent for p in path.glob("*/manifest.json"))
            if not models:
                raise ModelError(f"{path} is neither a model folder nor a store of model folders (no manifest.json)")
            found.extend(models)
        else:
            raise ModelError(f"{path} does not exist")
    return found
