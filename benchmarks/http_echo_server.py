"""The REST transport ceiling: nnserve's own HTTP layer answering v2 inference requests with no model behind it.

    python benchmarks/http_echo_server.py --port-file FILE [--port 0] [--max-body BYTES]

What nnserve's REST frontend runs on, and nothing else: `server/frontends/rest_http.py`'s `HttpServer` (uvicorn with
httptools, nnserve's uvicorn settings) on a socket from its `listening_socket`, bodies read with its bounded
`read_body`, on the asyncio loop an empty grpc.aio server also runs on (as in `nnserve serve`). The ASGI callable in
front of it does the least a v2 server must do with the same bytes:

* `POST /v2/models/{model}[/versions/{v}]/infer` with a JSON body: parse it with orjson, the first input's `data`
  into a float32 numpy array of its `shape`, and answer that array as output `output` (orjson writes it from numpy);
* the same with `Inference-Header-Content-Length` (Triton's binary tensor extension): parse the JSON header, and
  answer a header declaring `output` with `binary_data_size` followed by the input's raw bytes, unparsed;
* `GET /v2/health/ready` and `GET /v2/models/{model}/ready`: 200.

So that nnserve's cost per request minus this one is what its routes, validation, batcher, onnxruntime, statistics and
encoding add (`rest.py` prints that breakdown). No metadata, configuration or statistics routes: perf_analyzer cannot
drive it (wrk does). Writes `{"pid", "grpc", "http"}` to the port file once listening; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson

from nnserve.server.frontends.rest_http import HttpServer, Message, Receive, Scope, Send, listening_socket, read_body

READY = b'{"ready":true}'
NOT_FOUND = b'{"error":"not found"}'
HEADER_LENGTH = b"inference-header-content-length"


def json_reply(model: str, body: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    request = orjson.loads(body)
    tensor = request["inputs"][0]
    array = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    response = {"model_name": model, "id": request.get("id", ""), "outputs": [
        {"name": "output", "datatype": "FP32", "shape": list(array.shape), "data": array.ravel()}]}
    return 200, orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY), [(b"content-type", b"application/json")]


def binary_reply(model: str, body: bytes, header_length: int) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    request = orjson.loads(memoryview(body)[:header_length])
    tensor = request["inputs"][0]
    size = int(tensor["parameters"]["binary_data_size"])
    tail = memoryview(body)[header_length:header_length + size]
    response = {"model_name": model, "id": request.get("id", ""), "outputs": [
        {"name": "output", "datatype": tensor["datatype"], "shape": tensor["shape"],
         "parameters": {"binary_data_size": size}}]}
    header = orjson.dumps(response)
    return 200, b"".join((header, tail)), [(b"content-type", b"application/octet-stream"),
                                          (HEADER_LENGTH, str(len(header)).encode())]


def echo_app(max_body: int) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        parts = scope["path"].strip("/").split("/")
        status, body, headers = 404, NOT_FOUND, [(b"content-type", b"application/json")]
        if scope["method"] == "GET" and parts[-1] == "ready":
            status, body = 200, READY
        elif scope["method"] == "POST" and len(parts) >= 4 and parts[:2] == ["v2", "models"] and parts[-1] == "infer":
            declared = dict(scope["headers"])
            length = declared.get(b"content-length")
            data = await read_body(receive, int(length) if length else None, max_body)
            header = declared.get(HEADER_LENGTH)
            status, body, headers = (binary_reply(parts[2], data, int(header)) if header is not None
                                     else json_reply(parts[2], data))
        start: Message = {"type": "http.response.start", "status": status,
                          "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})

    return app


async def serve(port: int, port_file: Path, max_body: int) -> None:
    grpc_server = grpc.aio.server()
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    http = HttpServer(echo_app(max_body), listening_socket("127.0.0.1", port, reuse_port=False), None)
    await http.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    temporary = port_file.with_name(f".{port_file.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"pid": os.getpid(), "grpc": grpc_port, "http": http.port}))
    os.replace(temporary, port_file)
    await stop.wait()
    await http.stop()
    await grpc_server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, required=True, help="{pid, grpc, http} as JSON once listening")
    parser.add_argument("--max-body", type=int, default=64 << 20, help="request body limit in bytes")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.port_file, args.max_body))


if __name__ == "__main__":
    main()
