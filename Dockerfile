# Serving image: ONNX Runtime, FastAPI and the shipped model store; no torch.
#   docker build -t fpn-serve .
#   docker run --rm -p 8000:8000 fpn-serve
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY fpn_serve ./fpn_serve
COPY training ./training
COPY models ./models
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
RUN useradd --create-home --uid 10001 fpn
USER 10001
WORKDIR /home/fpn
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"]
CMD ["fpn-serve", "--host", "0.0.0.0", "--port", "8000"]
