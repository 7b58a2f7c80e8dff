"""KServe's side of tests/test_rest_kserve.py and tests/test_deploy_kserve.py: run in the kserve client environment
(tests/client_envs.py), never imported by the suite. It imports kserve (and the kubernetes client it brings), numpy
and the standard library only, and judges nothing itself.

It reads a job (JSON) on stdin and writes one result per operation (JSON) on stdout, in order:
- `{"op": "validate", "schema": CLASS, "body": TEXT}`: nnserve's raw body through
  `kserve.protocol.rest.v2_datamodels.CLASS.model_validate`, strict and lax; the result holds each mode's pydantic
  error text, or null where the body passed.
- `{"op": "manifest", "kind": CLASS, "document": {...}}`: a deploy/kserve manifest read as kserve's generated
  Kubernetes model CLASS (V1alpha1ServingRuntime, V1alpha1ClusterServingRuntime, V1beta1InferenceService), nested
  Kubernetes types from the kubernetes client kserve depends on; the result holds the models' error (a required
  field missing, a value of the wrong type) and every key their schema does not define.
- `{"op": "server_live" | "server_ready"}` and `{"op": "model_ready", "model": NAME}`: the InferenceRESTClient call's
  answer.
- `{"op": "infer", "model": NAME, "id": ID, "inputs": [{"name", "datatype", "shape", "data", "binary"}],
  "parameters": {...}, "outputs": [NAME, ...], "output_parameters": {...}}`: `InferenceRESTClient.infer` with
  kserve's InferRequest; the result has the response's id, model name and each output's name, datatype, shape,
  parameters and values (`as_numpy().tolist()`), or the error (its class, message and HTTP status).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import httpx
import kserve.models
import kubernetes.client.models
import numpy as np
import pydantic
from kserve.inference_client import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve.protocol.rest import v2_datamodels

TIMEOUT_S = 30.0


def validate(schema: str, body: str) -> dict[str, Any]:
    model: type[pydantic.BaseModel] = getattr(v2_datamodels, schema)
    document = json.loads(body)
    result: dict[str, Any] = {"strict_error": None, "lax_error": None}
    for mode in ("strict", "lax"):
        try:
            model.model_validate(document, strict=mode == "strict")
        except pydantic.ValidationError as exc:
            result[f"{mode}_error"] = str(exc)
    return result


_PRIMITIVES: dict[str, tuple[type, ...]] = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _model_class(name: str) -> Any:
    """A generated model class: KServe's own, else the Kubernetes client's (V1Container, V1ObjectMeta, ...)."""
    return getattr(kserve.models, name, None) or getattr(kubernetes.client.models, name)


def _build(data: Any, kind: str, path: str, unknown: list[str]) -> Any:
    """`data` as generated model `kind`, recursively, the way the generated clients read an API server's answer;
    keys a model does not define are collected in `unknown` (the generated code would drop them silently)."""
    if kind.lower().startswith("list["):  # kserve writes list[X], the kubernetes client List[X]
        if not isinstance(data, list):
            raise TypeError(f"{path}: expected a list, found {type(data).__name__}")
        return [_build(item, kind[5:-1], f"{path}[{i}]", unknown) for i, item in enumerate(data)]
    if kind.lower().startswith(("dict(", "dict[")):  # dict(str, X) or Dict[str, X]
        if not isinstance(data, dict):
            raise TypeError(f"{path}: expected an object, found {type(data).__name__}")
        inner = kind[5:-1].split(",", 1)[1].strip()
        return {key: _build(value, inner, f"{path}.{key}", unknown) for key, value in data.items()}
    if kind in _PRIMITIVES:
        if not isinstance(data, _PRIMITIVES[kind]) or (kind != "bool" and isinstance(data, bool)):
            raise TypeError(f"{path}: expected {kind}, found {type(data).__name__} {data!r}")
        return data
    if kind in ("object", "datetime", "date"):
        return data
    cls = _model_class(kind)
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected an object ({kind}), found {type(data).__name__}")
    by_key = {key: attr for attr, key in cls.attribute_map.items()}
    unknown.extend(f"{path}.{key}" for key in data if key not in by_key)
    kwargs = {by_key[key]: _build(value, cls.openapi_types[by_key[key]], f"{path}.{key}", unknown)
              for key, value in data.items() if key in by_key}
    return cls(**kwargs)


def manifest(kind: str, document: dict[str, Any]) -> dict[str, Any]:
    """A manifest read as kserve's generated model `kind` (V1alpha1ClusterServingRuntime, ...): the result holds the
    model's error (a required field missing, a wrong type), if any, and the keys its schema does not define."""
    unknown: list[str] = []
    try:
        _build(document, kind, "$", unknown)
    except (ValueError, TypeError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "unknown": unknown}
    return {"error": None, "unknown": unknown}


def infer_request(op: dict[str, Any]) -> InferRequest:
    inputs = []
    for spec in op["inputs"]:
        tensor = InferInput(spec["name"], list(spec["shape"]), spec["datatype"])
        array = np.asarray(spec["data"], dtype=spec["numpy"]).reshape(spec["shape"])
        tensor.set_data_from_numpy(array, binary_data=bool(spec.get("binary", False)))
        inputs.append(tensor)
    outputs = [RequestedOutput(name, dict(op.get("output_parameters") or {}) or None) for name in op.get("outputs", [])]
    return InferRequest(op["model"], inputs, request_id=op.get("id"), parameters=op.get("parameters") or None,
                        request_outputs=outputs or None)


async def infer(client: InferenceRESTClient, base_url: str, op: dict[str, Any]) -> dict[str, Any]:
    headers: dict[str, str] = {}
    try:
        response = await client.infer(base_url, infer_request(op), model_name=op["model"], response_headers=headers)
    except httpx.HTTPStatusError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "status": exc.response.status_code}
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc), "status": None}
    return {
        "error": None,
        "id": response.id,
        "model_name": response.model_name,
        "content_type": headers.get("content-type"),
        "outputs": [{"name": o.name, "datatype": o.datatype, "shape": list(o.shape), "parameters": o.parameters,
                     "data": o.as_numpy().tolist()} for o in response.outputs],
    }


async def run(job: dict[str, Any]) -> list[dict[str, Any]]:
    base_url = job["base_url"]
    results = []
    async with InferenceRESTClient(RESTConfig(protocol="v2", timeout=TIMEOUT_S, retries=0)) as client:
        for op in job["ops"]:
            kind = op["op"]
            if kind == "validate":
                results.append(validate(op["schema"], op["body"]))
            elif kind == "manifest":
                results.append(manifest(op["kind"], op["document"]))
            elif kind == "server_live":
                results.append({"value": await client.is_server_live(base_url)})
            elif kind == "server_ready":
                results.append({"value": await client.is_server_ready(base_url)})
            elif kind == "model_ready":
                results.append({"value": await client.is_model_ready(base_url, op["model"])})
            elif kind == "infer":
                results.append(await infer(client, base_url, op))
            else:
                raise ValueError(f"unknown op {kind!r}")
    return results


def main() -> None:
    job = json.load(sys.stdin)
    json.dump(asyncio.run(run(job)), sys.stdout)


if __name__ == "__main__":
    main()
