"""The HTTP protocols: the only subpackage of fpn_serve that imports FastAPI or Starlette.

app.py         create_app: routes, error table and middleware put together
classify.py    POST /classify, its lean path (parsers in lean.py)
v2.py          the Open Inference Protocol (KServe v2) routes
meta.py        GET /models, /healthz, /metrics
demo.py        the demo page (static/)
errors.py      one table from exception to status, for both error shapes
middleware.py  bearer token, request metrics, body limit (pure ASGI)
execute.py     running a request within its timeout; abandoned work leaves the batch
"""
