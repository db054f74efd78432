# fpn-serve images, one Dockerfile, three targets (the README gives sizes and commands):
#   docker build --target cpu   -t fpn-serve:cpu .    # ONNX Runtime on the CPU (the default target)
#   docker build --target gpu   -t fpn-serve:gpu .    # onnxruntime-gpu on CUDA 13 / cuDNN 9
#   docker build --target train -t fpn-serve:train .  # torch, for fpn-train / fpn-export on GPU nodes
# The serving images hold no torch. The shipped model store lives inside the package
# (site-packages/fpn_serve/models); mount another store and pass it as the argument.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fpn_serve ./fpn_serve
COPY training ./training
COPY models ./models
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim AS train
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/*.whl)[train]" && rm -rf /wheels \
 && useradd --create-home --uid 10001 fpn
USER 10001
WORKDIR /home/fpn
CMD ["fpn-train", "--help"]

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 VIRTUAL_ENV=/opt/fpn PATH=/opt/fpn/bin:$PATH \
    FPN_SERVE_HOST=0.0.0.0 FPN_SERVE_DEVICE=cuda
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/fpn
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir onnxruntime-gpu==1.31.1 -r /tmp/requirements-serve.txt \
 && pip install --no-cache-dir --no-deps /wheels/*.whl \
 && rm -rf /wheels /tmp/requirements-serve.txt \
 && useradd --create-home --uid 10001 fpn
USER 10001
WORKDIR /home/fpn
EXPOSE 8000
EXPOSE 8001
HEALTHCHECK --interval=30s --timeout=3s CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')"]
CMD ["fpn-serve"]

FROM python:3.11-slim AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 FPN_SERVE_HOST=0.0.0.0
COPY deploy/requirements-serve.txt /tmp/requirements-serve.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir onnxruntime==1.31.1 -r /tmp/requirements-serve.txt \
 && pip install --no-cache-dir --no-deps /wheels/*.whl \
 && rm -rf /wheels /tmp/requirements-serve.txt \
 && useradd --create-home --uid 10001 fpn
USER 10001
WORKDIR /home/fpn
EXPOSE 8000
EXPOSE 8001
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready')"]
CMD ["fpn-serve"]
