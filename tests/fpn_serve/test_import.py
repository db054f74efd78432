from __future__ import annotations

import subprocess
import sys


def test_fpn_serve_never_imports_torch() -> None:
    code = (
        "import sys, fpn_serve, fpn_serve.http.app, fpn_serve.cli, fpn_serve.runtime.engine\n"
        "import fpn_serve.contract.images, fpn_serve.batching.registry\n"
        "from fpn_serve import Engine\n"
        "Engine.load(fpn_serve.contract.store.default_store() / 'mnist', device='cpu')\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "assert 'training' not in sys.modules\n"
        "print('clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"


def test_only_the_http_layer_imports_fastapi_or_starlette() -> None:
    """Every module of fpn_serve but fpn_serve.http (and the cli that starts it) loads without
    FastAPI and Starlette, and none names them in an import."""
    import ast
    import pkgutil
    from pathlib import Path

    import fpn_serve

    root = Path(fpn_serve.__file__).parent
    outside = [
        m.name
        for m in pkgutil.walk_packages([str(root)], "fpn_serve.")
        if not m.name.startswith(("fpn_serve.http", "fpn_serve.models")) and m.name != "fpn_serve.cli"
    ]
    assert {"fpn_serve.batching.registry", "fpn_serve.batching.scheduler", "fpn_serve.settings"} <= set(outside)
    for path in root.rglob("*.py"):
        if path.relative_to(root).parts[0] in ("http", "cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not any(n.split(".")[0] in ("fastapi", "starlette") for n in names), (path, names)
    code = (
        "import importlib, sys\n"
        f"for name in {outside!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette'}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_v2_routes_and_the_app_do_not_import_each_other() -> None:
    code = "import sys, fpn_serve.http.v2\nprint('fpn_serve.http.app' in sys.modules)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
