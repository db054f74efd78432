from __future__ import annotations

import subprocess
import sys


def test_fpn_serve_never_imports_torch() -> None:
    code = (
        "import sys, fpn_serve, fpn_serve.http.app, fpn_serve.cli, fpn_serve.runtime.engine, fpn_serve.contract.images\n"
        "from fpn_serve import Engine\n"
        "Engine.load(fpn_serve.contract.store.default_store() / 'mnist', device='cpu')\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
        "assert 'training' not in sys.modules\n"
        "print('clean')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "clean"
