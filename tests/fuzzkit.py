"""Schemathesis over the server's own /openapi.json, in process (Litestar's test client, no sockets).

Schemathesis generates the requests (bodies valid by the generated schemas, and bodies that break them: wrong
types, unknown fields, non-JSON bytes, other media types) for every operation the document lists — whatever
routes are registered. Each answer must be: not a 5xx, within a time bound, a 4xx in OpenAI's envelope, and
a 200 stream free of server errors.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import attrs

#: the slowest answer allowed (a hang shows as this, not as pytest's global timeout)
MAX_SECONDS = 60.0


@attrs.define
class FuzzReport:
    requests: int = 0
    by_status: Counter = attrs.Factory(Counter)
    by_operation: Counter = attrs.Factory(Counter)
    failures: list[str] = attrs.Factory(list)
    slowest: float = 0.0


def _kwargs(case: Any, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    kw = case.as_transport_kwargs(base_url="http://testserver")
    if drop and isinstance(kw.get("json"), dict):
        kw["json"] = {k: v for k, v in kw["json"].items() if k not in drop}
    out: dict[str, Any] = {"method": kw["method"], "url": kw["url"], "params": kw.get("params") or None,
                           "headers": {k: v for k, v in (kw.get("headers") or {}).items()
                                       if k.lower() not in ("connection", "accept-encoding")}}
    if "json" in kw:
        out["content"] = json.dumps(kw["json"], allow_nan=True).encode()
        out["headers"].setdefault("Content-Type", "application/json")
    elif isinstance(kw.get("data"), (bytes, str)):
        out["content"] = kw["data"]
    elif kw.get("data") is not None:
        out["data"] = kw["data"]
    if kw.get("files"):
        out["files"] = kw["files"]
    return out


def check_response(label: str, response: Any, seconds: float, report: FuzzReport) -> None:
    status = response.status_code
    report.by_status[status] += 1
    report.slowest = max(report.slowest, seconds)
    problem = None
    if status >= 500:
        problem = f"{status}: {response.text[:300]}"
    elif seconds > MAX_SECONDS:
        problem = f"took {seconds:.1f} s"
    elif status >= 400:
        try:
            err = response.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
        except Exception:  # noqa: BLE001 - any shape but the envelope is the failure
            problem = f"{status} not in the envelope: {response.text[:300]}"
    elif "text/event-stream" in response.headers.get("content-type", ""):
        for line in response.text.splitlines():
            if line.startswith("data: {\"error\"") and "server_error" in line:
                problem = f"server error inside the stream: {line[:300]}"
                break
    if problem:
        report.failures.append(f"{label}: {problem}")


def _real_files(kw: dict[str, Any], files: dict[str, bytes], turn: int) -> None:
    """On every other request, a multipart field named in ``files`` carries that real file instead of the
    random bytes generated for it (so the fields around it get past the decoding)."""
    if not files or not kw.get("files") or turn % 2:
        return
    kw["files"] = [(name, (f"{name}.bin", files[name], "application/octet-stream")) if name in files else
                   (name, value) for name, value in kw["files"]]


def _named_model(kw: dict[str, Any], models: tuple[str, ...], turn: int) -> None:
    """On every other request whose body is a JSON object, ``model`` names a served model (in turn), so a
    server of several models routes it instead of answering 404 to a generated name."""
    if not models or turn % 2 or not kw.get("content"):
        return
    try:
        body = json.loads(kw["content"])
    except ValueError:
        return
    if isinstance(body, dict):
        body["model"] = models[(turn // 2) % len(models)]
        kw["content"] = json.dumps(body, allow_nan=True).encode()


def fuzz(client: Any, *, examples: int, seed: int = 0, methods: tuple[str, ...] = ("POST", "GET", "DELETE"),
         api_key: str | None = None, paths: tuple[str, ...] = ("/",), files: dict[str, bytes] | None = None,
         models: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> FuzzReport:
    """Run ``examples`` positive and ``examples`` negative cases against every operation of the client's
    /openapi.json whose method is in ``methods`` and whose path starts with one of ``paths``; ``files``:
    real contents for multipart file fields, sent on every other request; ``models``: served names that
    every other JSON body names; ``drop``: JSON body keys left out (``model``, so that cases reach the one
    model instead of a 404)."""
    import schemathesis
    from hypothesis import HealthCheck, given, seed as hseed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    doc = client.get("/openapi.json").json()
    schema = schemathesis.openapi.from_dict(doc)
    report = FuzzReport()
    extra = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    for result in schema.get_all_operations():
        op = result.ok()
        if op.method.upper() not in methods or not op.path.startswith(paths):
            continue
        label = f"{op.method.upper()} {op.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hseed(seed)
            @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                kw = _kwargs(case, drop)
                kw["headers"].update(extra)
                _real_files(kw, files or {}, report.requests)
                _named_model(kw, models, report.requests)
                start = time.monotonic()
                response = client.request(**kw)
                report.requests += 1
                report.by_operation[label] += 1
                check_response(label, response, time.monotonic() - start, report)

            try:
                run()
            except Unsatisfiable:  # nothing to break: an operation with no body and no parameters
                assert mode is GenerationMode.NEGATIVE and op.body is None or not op.body, label
    return report
