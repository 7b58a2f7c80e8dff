"""Raw HTTP requests for the REST tests, as `curl` sends them: the standard library only, no client of ours.

`call` returns (status, headers, body) for any status, so that tests assert on errors as on successes.
"""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any

import numpy as np


class Headers(dict[str, str]):
    """Response headers by case-insensitive name, as HTTP defines them."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return super().get(name.lower(), default)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header_json(self) -> Any:
        """The JSON part of a binary-extension response."""
        length = int(self.headers["Inference-Header-Content-Length"])
        return json.loads(self.body[:length])

    def tail(self) -> bytes:
        return self.body[int(self.headers["Inference-Header-Content-Length"]):]


def call(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         *, timeout: float = 30.0, context: ssl.SSLContext | None = None) -> Reply:
    """One request on its own connection to 127.0.0.1:`port` (https when `context` is given)."""
    if context is None:
        connection: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        headers = Headers({name.lower(): value for name, value in response.getheaders()})
        return Reply(response.status, headers, response.read())
    finally:
        connection.close()


def get(port: int, path: str, **options: Any) -> Reply:
    return call(port, "GET", path, **options)


def post_json(port: int, path: str, document: Any, headers: dict[str, str] | None = None, **options: Any) -> Reply:
    return call(port, "POST", path, json.dumps(document).encode(), headers, **options)


def binary_request(document: dict[str, Any], tensors: list[np.ndarray]) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body: the JSON header (each listed input gets its binary_data_size) then the raw bytes."""
    tails = [np.ascontiguousarray(t).tobytes() for t in tensors]
    inputs = [item for item in document["inputs"] if "data" not in item]
    for item, tail in zip(inputs, tails, strict=True):
        item.setdefault("parameters", {})["binary_data_size"] = len(tail)
    header = json.dumps(document).encode()
    return header + b"".join(tails), {"Inference-Header-Content-Length": str(len(header))}


def v2_input(name: str, array: np.ndarray, datatype: str, *, nested: bool = False) -> dict[str, Any]:
    data = array.tolist() if nested else array.reshape(-1).tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}
