"""What the images and the Kubernetes manifests would do, checked without a container engine.

A fresh virtual environment gets exactly the CPU image's install (onnxruntime and
deploy/requirements-serve.txt, then fpn-serve without dependencies) and runs the image's own CMD
with its ENV (host moved to loopback): the v2 readiness route and a classification answer, and
torch is not importable there.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from .conftest import _free_port, wait_until_up  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parent.parent


def _stage(name: str) -> str:
    text = (REPO / "Dockerfile").read_text()
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", text, flags=re.S | re.M)
    assert match, f"no stage {name!r} in the Dockerfile"
    return match.group(1)


def _env(stage: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+(?:\\\n.+)*)", stage, flags=re.M):
        for key, value in re.findall(r"(\w+)=(\S+)", line.replace("\\\n", " ")):
            env[key] = value
    return env


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("serve-only") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    install = re.search(r"pip install --no-cache-dir (onnxruntime==\S+) -r", _stage("cpu"))
    assert install, "the cpu stage must install onnxruntime explicitly"
    subprocess.run([*pip, install.group(1), "-r", str(REPO / "deploy" / "requirements-serve.txt")], check=True)
    subprocess.run([*pip, "--no-deps", str(REPO)], check=True)
    return venv


@pytest.mark.slow
def test_the_cpu_image_command_serves_without_torch(serving_venv: Path, tmp_path: Path) -> None:
    python = serving_venv / "bin" / "python"
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    stage = _stage("cpu")
    cmd = json.loads(re.findall(r"^CMD (\[.*\])$", stage, flags=re.M)[-1])
    env = {**os.environ, **_env(stage)}
    assert env["FPN_SERVE_HOST"] == "0.0.0.0"  # what the image does; the test stays on loopback:
    port = _free_port()
    env.update(FPN_SERVE_HOST="127.0.0.1", FPN_SERVE_PORT=str(port), PATH=f"{serving_venv / 'bin'}:{env['PATH']}")
    env.pop("PYTHONPATH", None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            assert wait_until_up(client, proc, "/v2/health/ready"), "the image's command did not come up"
            png = (REPO / "examples" / "seven.png").read_bytes()
            r = client.post("/classify", content=png, headers={"content-type": "image/png"})
            assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "7"
            models = client.get("/models").json()
            assert models[0]["name"] == "mnist"
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert "site-packages/fpn_serve/models/mnist" in output  # the store inside the installed package
    assert "Traceback" not in output


def test_manifests_agree_with_the_server_and_the_image() -> None:
    docs = {}
    for path in sorted((REPO / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler", "InferenceService"}
    exposed = int(re.search(r"^EXPOSE (\d+)$", _stage("gpu"), flags=re.M).group(1))  # type: ignore[union-attr]
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == exposed
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1  # one server process per GPU
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert all(e["name"].startswith("FPN_SERVE_") for e in container["env"])
    from fpn_serve.settings import Settings

    assert {e["name"].removeprefix("FPN_SERVE_").lower() for e in container["env"]} <= set(Settings.model_fields)
    assert docs["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == "fpn_queue_depth"
    predictor = docs["InferenceService"]["spec"]["predictor"]["containers"][0]
    assert predictor["ports"][0]["containerPort"] == exposed
    assert predictor["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


@pytest.mark.slow
def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    files = [str(p) for p in sorted((REPO / "deploy" / "k8s").glob("*.yaml")) if "inferenceservice" not in p.name]
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *files], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(files)
