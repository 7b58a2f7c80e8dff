"""The committed protobuf modules are fresh, and wire-compatible with Triton's client.

tritonclient ships its own copy of the same protocol: the same message full names
(`inference.ModelInferRequest`, ...) as ours. Both cannot live in one process's default
descriptor pool, so everything that needs tritonclient runs in ONE subprocess that imports
only tritonclient's modules. It gets our serialized messages through a JSON file, decodes
them with tritonclient's classes and reports back what it saw; it also sends back
messages built by tritonclient's own request helpers, which we decode here.
"""

from __future__ import annotations

import base64
import inspect
import json
import re
import shutil
import subprocess
import sys
import textwrap
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.unknown_fields import UnknownFieldSet

from nnserve.protos import generate as protogen
from nnserve.protos import grpc_service_pb2 as pb
from nnserve.protos import grpc_service_pb2_grpc as pb_grpc
from nnserve.protos import model_config_pb2 as mc

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTOS = Path(protogen.__file__).resolve().parent
SERVICE = "inference.GRPCInferenceService"


# --------------------------------------------------------------------------- helpers
# The next two functions are also sent, as source, to the tritonclient subprocess: they
# may only use names that the subprocess imports too (UnknownFieldSet).


def _unknown_field_paths(msg, path):
    """Paths inside `msg` holding fields that the decoding schema did not know."""
    found = [path or "<root>"] if len(UnknownFieldSet(msg)) else []
    for field, value in msg.ListFields():
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is None:
                continue
            items = [(f"{path}.{field.name}[{key!r}]", v) for key, v in value.items()]
        elif field.is_repeated:
            items = [(f"{path}.{field.name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(f"{path}.{field.name}", value)]
        for item_path, item in items:
            found += _unknown_field_paths(item, item_path)
    return found


def _descriptor_schema(file_descriptors):
    """Everything about messages, enums and services that decides the wire format."""
    messages, enums, services = {}, {}, {}

    def add_enum(enum):
        enums[enum.full_name] = {v.name: v.number for v in enum.values}

    def add_message(desc):
        fields = {}
        for f in desc.fields:
            ref = f.message_type or f.enum_type
            fields[f.name] = {
                "number": f.number,
                "type": f.type,
                "repeated": f.is_repeated,
                "presence": f.has_presence,
                "type_name": ref.full_name if ref else "",
                "oneof": f.containing_oneof.name if f.containing_oneof else "",
            }
        messages[desc.full_name] = {"map_entry": desc.GetOptions().map_entry, "fields": fields}
        for enum in desc.enum_types:
            add_enum(enum)
        for nested in desc.nested_types:
            add_message(nested)

    for fd in file_descriptors:
        for enum in fd.enum_types_by_name.values():
            add_enum(enum)
        for desc in fd.message_types_by_name.values():
            add_message(desc)
        for svc in fd.services_by_name.values():
            services[svc.full_name] = {
                m.name: [
                    m.input_type.full_name,
                    m.output_type.full_name,
                    m.client_streaming,
                    m.server_streaming,
                ]
                for m in svc.methods
            }
    return {"messages": messages, "enums": enums, "services": services}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _as_dict(msg: Message) -> dict[str, Any]:
    """JSON-shaped view of a message (int64 as strings, bytes as base64), as after a JSON trip."""
    return json.loads(json.dumps(json_format.MessageToDict(msg, preserving_proto_field_name=True)))


def _set_fields(msg: Message) -> set[tuple[str, str]]:
    """(message full name, field name) of every field set anywhere inside `msg`."""
    found = set()
    for field, value in msg.ListFields():
        found.add((msg.DESCRIPTOR.full_name, field.name))
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is None:
                continue
            children = list(value.values())
        elif field.is_repeated:
            children = list(value)
        else:
            children = [value]
        for child in children:
            found |= _set_fields(child)
    return found


def _bytes_tensor(items: list[bytes]) -> bytes:
    """Raw BYTES tensor layout: each element prefixed by its little-endian uint32 length."""
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def _duration(count: int, ns: int) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=count, ns=ns)


# --------------------------------------------------------------------------- samples
# Messages built with OUR classes. Between them they set every field of every message we
# define to a non-default value (test_wire_samples_set_every_field checks that), so the
# round trip through tritonclient verifies every field number and type.


def _infer_parameters(target) -> None:
    target["sequence_id"].int64_param = -7
    target["sequence_start"].bool_param = True
    target["priority"].uint64_param = 2**63 + 5
    target["tag"].string_param = "abc"
    target["scale"].double_param = 0.25


def _model_infer_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="dense", model_version="3", id="req-42")
    _infer_parameters(req.parameters)
    raw = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 3])
    raw.parameters["binary_data_size"].int64_param = 24
    typed = req.inputs.add(name="INPUT1", datatype="INT64", shape=[1, 2])
    typed.contents.int64_contents.extend([-(2**63), 2**40])
    out = req.outputs.add(name="OUTPUT0")
    out.parameters["classification"].int64_param = 3
    req.raw_input_contents.append(np.arange(6, dtype="<f4").tobytes())
    return req


def _tensor_contents() -> pb.InferTensorContents:
    return pb.InferTensorContents(
        bool_contents=[True, False],
        int_contents=[-1, 2**31 - 1],
        int64_contents=[-(2**63), 7],
        uint_contents=[2**32 - 1, 1],
        uint64_contents=[2**64 - 1, 2],
        fp32_contents=[1.5, -2.25],
        fp64_contents=[1e300, 0.1],
        bytes_contents=[b"", b"\x00\xff"],
    )


def _model_infer_response() -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(model_name="dense", model_version="3", id="req-42")
    resp.parameters["triton_final_response"].bool_param = True
    out = resp.outputs.add(name="PROBS", datatype="FP64", shape=[1, 2])
    out.parameters["binary_data_size"].uint64_param = 16
    out.contents.fp64_contents.extend([0.75, 0.25])
    resp.raw_output_contents.append(np.array([0.75, 0.25], dtype="<f8").tobytes())
    return resp


def _raw_infer_response() -> pb.ModelInferResponse:
    """All outputs raw, as the server sends them; decoded with tritonclient's InferResult."""
    resp = pb.ModelInferResponse(model_name="dense", model_version="1")
    resp.outputs.add(name="OUTPUT0", datatype="FP32", shape=[2, 2])
    resp.raw_output_contents.append(np.array([[1.0, -2.5], [3.25, 0.0]], dtype="<f4").tobytes())
    resp.outputs.add(name="LABELS", datatype="BYTES", shape=[2])
    resp.raw_output_contents.append(_bytes_tensor([b"cat", b""]))
    resp.outputs.add(name="IDX", datatype="INT64", shape=[3])
    resp.raw_output_contents.append(np.array([5, -1, 2**40], dtype="<i8").tobytes())
    return resp


def _full_model_config() -> mc.ModelConfig:
    queue = mc.ModelQueuePolicy(
        timeout_action=mc.ModelQueuePolicy.DELAY,
        default_timeout_microseconds=10_000,
        allow_timeout_override=True,
        max_queue_size=128,
    )
    return mc.ModelConfig(
        name="dense",
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        runtime="libtriton_onnxruntime.so",
        version_policy=mc.ModelVersionPolicy(
            specific=mc.ModelVersionPolicy.Specific(versions=[1, 3])
        ),
        max_batch_size=64,
        input=[
            mc.ModelInput(
                name="INPUT0",
                data_type=mc.TYPE_FP32,
                format=mc.ModelInput.FORMAT_NCHW,
                dims=[3, -1, 224],
                reshape=mc.ModelTensorReshape(shape=[3, -1, 224, 1]),
                allow_ragged_batch=True,
                optional=True,
                is_non_linear_format_io=True,
            ),
            mc.ModelInput(name="SHAPE", data_type=mc.TYPE_INT32, dims=[2], is_shape_tensor=True),
        ],
        output=[
            mc.ModelOutput(
                name="OUTPUT0",
                data_type=mc.TYPE_BF16,
                dims=[10],
                reshape=mc.ModelTensorReshape(shape=[2, 5]),
                label_filename="labels.txt",
                is_shape_tensor=True,
                is_non_linear_format_io=True,
            )
        ],
        dynamic_batching=mc.ModelDynamicBatching(
            preferred_batch_size=[8, 32],
            max_queue_delay_microseconds=500,
            preserve_ordering=True,
            priority_levels=2,
            default_priority_level=1,
            default_queue_policy=queue,
            priority_queue_policy={2: mc.ModelQueuePolicy(max_queue_size=4)},
        ),
        instance_group=[
            mc.ModelInstanceGroup(
                name="dense_gpu",
                kind=mc.ModelInstanceGroup.KIND_GPU,
                count=2,
                gpus=[0, 1],
                profile=["0"],
                passive=True,
                host_policy="numa0",
            )
        ],
        default_model_filename="model.onnx",
        cc_model_filenames={"9.0": "model_sm90.onnx"},
        metric_tags={"team": "ml"},
        parameters={"intra_op_thread_count": mc.ModelParameter(string_value="4")},
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        response_cache=mc.ModelResponseCache(enable=True),
    )


def _small_model_configs() -> dict[str, mc.ModelConfig]:
    """Non-batching config and the remaining version-policy choices."""
    latest = mc.ModelConfig(
        name="tiny",
        backend="onnxruntime",
        max_batch_size=0,
        version_policy=mc.ModelVersionPolicy(latest=mc.ModelVersionPolicy.Latest(num_versions=2)),
        input=[mc.ModelInput(name="x", data_type=mc.TYPE_STRING, dims=[-1])],
        output=[mc.ModelOutput(name="y", data_type=mc.TYPE_UINT8, dims=[4, 4])],
        instance_group=[mc.ModelInstanceGroup(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)],
    )
    every = mc.ModelConfig(name="tiny")
    every.version_policy.all.SetInParent()  # an empty message: presence alone selects it
    return {"latest": latest, "all": every}


def _wire_samples() -> dict[str, Message]:
    stats = pb.ModelStatistics(
        name="dense",
        version="1",
        last_inference=1_700_000_000_123,
        inference_count=96,
        execution_count=3,
        inference_stats=pb.InferStatistics(
            success=_duration(3, 3_000),
            fail=_duration(1, 10),
            queue=_duration(3, 300),
            compute_input=_duration(3, 30),
            compute_infer=_duration(3, 2_000),
            compute_output=_duration(3, 40),
            cache_hit=_duration(1, 5),
            cache_miss=_duration(2, 6),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=32,
                compute_input=_duration(1, 11),
                compute_infer=_duration(1, 12),
                compute_output=_duration(1, 13),
            )
        ],
        memory_usage=[pb.MemoryUsage(type="GPU", id=1, byte_size=1 << 33)],
        response_stats={
            "0": pb.InferResponseStatistics(
                compute_infer=_duration(4, 1),
                compute_output=_duration(4, 2),
                success=_duration(4, 3),
                fail=_duration(1, 4),
                empty_response=_duration(1, 5),
                cancel=_duration(1, 6),
            )
        },
    )
    tensor = pb.ModelMetadataResponse.TensorMetadata
    load = pb.RepositoryModelLoadRequest(repository_name="models", model_name="dense")
    load.parameters["config"].string_param = '{"max_batch_size": 8}'
    load.parameters["file:1/model.onnx"].bytes_param = b"\x08\x0a\x00"
    load.parameters["poll"].bool_param = True
    load.parameters["retries"].int64_param = -2
    unload = pb.RepositoryModelUnloadRequest(repository_name="models", model_name="dense")
    unload.parameters["unload_dependents"].bool_param = True
    small = _small_model_configs()
    return {
        "ServerLiveResponse": pb.ServerLiveResponse(live=True),
        "ServerReadyResponse": pb.ServerReadyResponse(ready=True),
        "ModelReadyRequest": pb.ModelReadyRequest(name="dense", version="2"),
        "ModelReadyResponse": pb.ModelReadyResponse(ready=True),
        "ServerMetadataResponse": pb.ServerMetadataResponse(
            name="nnserve", version="0.1.0", extensions=["model_configuration", "statistics"]
        ),
        "ModelMetadataRequest": pb.ModelMetadataRequest(name="dense", version="1"),
        "ModelMetadataResponse": pb.ModelMetadataResponse(
            name="dense",
            versions=["1", "3"],
            platform="onnxruntime_onnx",
            inputs=[tensor(name="INPUT0", datatype="FP32", shape=[-1, 3])],
            outputs=[tensor(name="OUTPUT0", datatype="BYTES", shape=[-1])],
        ),
        "InferParameter": pb.InferParameter(double_param=-0.5),
        "InferTensorContents": _tensor_contents(),
        "ModelInferRequest": _model_infer_request(),
        "ModelInferResponse": _model_infer_response(),
        "ModelInferResponse(raw)": _raw_infer_response(),
        "ModelStreamInferResponse": pb.ModelStreamInferResponse(
            infer_response=_model_infer_response()
        ),
        "ModelStreamInferResponse(error)": pb.ModelStreamInferResponse(
            error_message="unknown model 'nope'"
        ),
        "ModelConfigRequest": pb.ModelConfigRequest(name="dense", version="1"),
        "ModelConfigResponse": pb.ModelConfigResponse(config=_full_model_config()),
        "ModelConfigResponse(latest)": pb.ModelConfigResponse(config=small["latest"]),
        "ModelConfigResponse(all)": pb.ModelConfigResponse(config=small["all"]),
        "ModelStatisticsRequest": pb.ModelStatisticsRequest(name="dense", version="1"),
        "ModelStatisticsResponse": pb.ModelStatisticsResponse(model_stats=[stats]),
        "RepositoryIndexRequest": pb.RepositoryIndexRequest(repository_name="models", ready=True),
        "RepositoryIndexResponse": pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name="dense", version="1", state="UNAVAILABLE", reason="unloaded"
                )
            ]
        ),
        "RepositoryModelLoadRequest": load,
        "RepositoryModelUnloadRequest": unload,
        # Empty messages: only their names are checked.
        "ServerLiveRequest": pb.ServerLiveRequest(),
        "ServerReadyRequest": pb.ServerReadyRequest(),
        "ServerMetadataRequest": pb.ServerMetadataRequest(),
        "RepositoryModelLoadResponse": pb.RepositoryModelLoadResponse(),
        "RepositoryModelUnloadResponse": pb.RepositoryModelUnloadResponse(),
    }


SAMPLES = _wire_samples()


# --------------------------------------------------------------------------- subprocess

_CHILD_MAIN = """
import base64
import json
import sys
from pathlib import Path

import numpy as np
from google.protobuf import json_format
from google.protobuf.unknown_fields import UnknownFieldSet

import tritonclient.grpc as grpcclient
from tritonclient.grpc import _utils, model_config_pb2, service_pb2, service_pb2_grpc


def b64(data):
    return base64.b64encode(data).decode("ascii")


def triton_class(full_name):
    name = full_name.removeprefix("inference.")
    return getattr(service_pb2, name, None) or getattr(model_config_pb2, name)


payload = json.loads(Path(sys.argv[1]).read_text())
result = {"decoded": {}}

# 1. Decode our messages with tritonclient's classes.
for key, item in payload["samples"].items():
    msg = triton_class(item["type"]).FromString(base64.b64decode(item["data"]))
    result["decoded"][key] = {
        "type": msg.DESCRIPTOR.full_name,
        "dict": json_format.MessageToDict(msg, preserving_proto_field_name=True),
        "unknown": _unknown_field_paths(msg, ""),
        "data": b64(msg.SerializeToString(deterministic=True)),
    }

# 2. What the client-side tools read from a response: InferResult over raw outputs.
raw = service_pb2.ModelInferResponse.FromString(base64.b64decode(payload["raw_response"]))
infer_result = grpcclient.InferResult(raw)
result["as_numpy"] = {}
for out in raw.outputs:
    arr = infer_result.as_numpy(out.name)
    values = [b64(v) for v in arr.ravel()] if arr.dtype == object else arr.ravel().tolist()
    result["as_numpy"][out.name] = {"dtype": str(arr.dtype), "shape": list(arr.shape),
                                    "values": values}

# 3. The schema and the stub's method paths.
result["schema"] = _descriptor_schema([service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR])


class RecordingChannel:
    def __init__(self):
        self.paths = {}

    def __getattr__(self, kind):
        def make(path, *args, **kwargs):
            self.paths[path] = kind
        return make


channel = RecordingChannel()
service_pb2_grpc.GRPCInferenceServiceStub(channel)
result["stub_paths"] = channel.paths

# 4. Requests as tritonclient builds them, for us to decode.
fp32 = grpcclient.InferInput("INPUT0", [2, 3], "FP32")
fp32.set_data_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3) / 4)
text = grpcclient.InferInput("TEXT", [2], "BYTES")
text.set_data_from_numpy(np.array([b"hello", b"\\x00\\xff"], dtype=np.object_))
request = _utils._get_inference_request(
    model_name="dense",
    inputs=[fp32, text],
    model_version="1",
    request_id="r-1",
    outputs=[grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)],
    sequence_id=9,
    sequence_start=True,
    sequence_end=False,
    priority=3,
    timeout=1000,
    parameters={"custom_str": "v", "custom_float": 0.5, "custom_bool": True},
)
load = service_pb2.RepositoryModelLoadRequest(model_name="dense")
load.parameters["config"].string_param = "{}"
load.parameters["file:1/model.onnx"].bytes_param = b"\\x08\\x01"
result["from_triton"] = {
    "ModelInferRequest": b64(request.SerializeToString()),
    "RepositoryModelLoadRequest": b64(load.SerializeToString()),
}

leaked = sorted(name for name in sys.modules if name.startswith("nnserve"))
assert not leaked, f"the tritonclient subprocess imported our modules: {leaked}"
Path(sys.argv[2]).write_text(json.dumps(result))
"""


def _child_script() -> str:
    helpers = [inspect.getsource(f) for f in (_unknown_field_paths, _descriptor_schema)]
    # The helpers go after the imports and before the code that uses them.
    head, sep, body = _CHILD_MAIN.partition("\n\ndef b64(")
    return textwrap.dedent(head) + "\n\n" + "\n\n".join(helpers) + sep + body


@pytest.fixture(scope="module")
def triton_view(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the tritonclient subprocess once; return what it reported."""
    if find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed (pip install -e '.[test]')")
    work = tmp_path_factory.mktemp("triton")
    payload = {
        "samples": {
            key: {"type": msg.DESCRIPTOR.full_name, "data": _b64(msg.SerializeToString())}
            for key, msg in SAMPLES.items()
        },
        "raw_response": _b64(SAMPLES["ModelInferResponse(raw)"].SerializeToString()),
    }
    (work / "in.json").write_text(json.dumps(payload))
    proc = subprocess.run(
        [sys.executable, "-c", _child_script(), str(work / "in.json"), str(work / "out.json")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"tritonclient subprocess failed:\n{proc.stderr}"
    return json.loads((work / "out.json").read_text())


# --------------------------------------------------------------------------- generation


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = protogen.generate(tmp_path)
    assert [p.name for p in fresh] == protogen.expected_outputs()
    stale = [p.name for p in fresh if (PROTOS / p.name).read_bytes() != p.read_bytes()]
    assert not stale, f"{stale} are stale: run `python -m nnserve.protos.generate`"


def test_protos_folder_holds_only_expected_generated_files() -> None:
    generated = sorted(
        p.name for p in PROTOS.iterdir() if re.search(r"_pb2(_grpc)?\.pyi?$", p.name)
    )
    assert generated == protogen.expected_outputs()
    assert (PROTOS / "py.typed").is_file()


def test_generated_imports_are_package_absolute() -> None:
    for name in protogen.expected_outputs():
        text = (PROTOS / name).read_text(encoding="utf-8")
        bare = re.findall(r"^import \w+_pb2\b.*$", text, flags=re.MULTILINE)
        assert not bare, f"{name} has bare imports: {bare}"
    service_py = (PROTOS / "grpc_service_pb2.py").read_text(encoding="utf-8")
    assert "from nnserve.protos import model_config_pb2 " in service_py
    grpc_py = (PROTOS / "grpc_service_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from nnserve.protos import grpc_service_pb2 " in grpc_py
    assert pb.ModelConfigResponse.DESCRIPTOR.fields_by_name["config"].message_type is (
        mc.ModelConfig.DESCRIPTOR
    )


def test_check_mode_reports_changed_and_missing_files(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    for name in [*protogen.PROTO_FILES, *protogen.expected_outputs()]:
        shutil.copyfile(PROTOS / name, tmp_path / name)
    assert protogen.stale_files(tmp_path) == []
    with (tmp_path / "model_config_pb2.pyi").open("a", encoding="utf-8") as f:
        f.write("# edited by hand\n")
    (tmp_path / "grpc_service_pb2_grpc.py").unlink()
    assert protogen.stale_files(tmp_path) == ["grpc_service_pb2_grpc.py", "model_config_pb2.pyi"]


@pytest.mark.parametrize(
    "argv",
    [["-m", "nnserve.protos.generate"], [str(PROTOS / "generate.py")]],
    ids=["module", "script"],
)
def test_generate_check_runs_as_module_and_as_script(argv: list[str]) -> None:
    pytest.importorskip("grpc_tools")
    proc = subprocess.run(
        [sys.executable, *argv, "--check"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- schema


def test_wire_samples_set_every_field() -> None:
    schema = _descriptor_schema([pb.DESCRIPTOR, mc.DESCRIPTOR])
    every = {
        (message, field)
        for message, info in schema["messages"].items()
        if not info["map_entry"]
        for field in info["fields"]
    }
    covered = set().union(*(_set_fields(msg) for msg in SAMPLES.values()))
    assert sorted(every - covered) == []


def test_schema_matches_tritonclient_descriptors(triton_view: dict[str, Any]) -> None:
    ours = _descriptor_schema([pb.DESCRIPTOR, mc.DESCRIPTOR])
    theirs = triton_view["schema"]
    problems = []
    for name, info in ours["messages"].items():
        other = theirs["messages"].get(name)
        if other is None:
            problems.append(f"message {name} is not in tritonclient")
            continue
        if info["map_entry"] != other["map_entry"]:
            problems.append(f"message {name}: map_entry differs")
        for field, spec in info["fields"].items():
            if spec != other["fields"].get(field):
                problems.append(f"{name}.{field}: ours {spec}, theirs {other['fields'].get(field)}")
    for name, values in ours["enums"].items():
        if values != theirs["enums"].get(name):
            problems.append(f"enum {name}: ours {values}, theirs {theirs['enums'].get(name)}")
    for method, spec in ours["services"][SERVICE].items():
        if spec != theirs["services"][SERVICE].get(method):
            problems.append(f"rpc {method}: ours {spec}, theirs {theirs['services'][SERVICE]}")
    assert problems == []
    assert list(ours["services"]) == [SERVICE]


def test_service_method_paths_match_tritonclient_stub(triton_view: dict[str, Any]) -> None:
    class RecordingChannel:
        def __init__(self) -> None:
            self.paths: dict[str, str] = {}

        def __getattr__(self, kind: str):
            def make(path: str, *args: object, **kwargs: object) -> None:
                self.paths[path] = kind

            return make

    channel = RecordingChannel()
    pb_grpc.GRPCInferenceServiceStub(channel)
    expected_names = [
        "ServerLive",
        "ServerReady",
        "ModelReady",
        "ServerMetadata",
        "ModelMetadata",
        "ModelInfer",
        "ModelStreamInfer",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
        "RepositoryModelLoad",
        "RepositoryModelUnload",
    ]
    assert list(channel.paths) == [f"/{SERVICE}/{name}" for name in expected_names]
    assert channel.paths[f"/{SERVICE}/ModelStreamInfer"] == "stream_stream"
    theirs = triton_view["stub_paths"]
    assert {path: theirs.get(path) for path in channel.paths} == channel.paths
    servicer_methods = {n for n in vars(pb_grpc.GRPCInferenceServiceServicer) if n[0].isupper()}
    assert servicer_methods == set(expected_names)


# --------------------------------------------------------------------------- wire


@pytest.mark.parametrize("key", sorted(SAMPLES))
def test_our_message_decodes_identically_with_tritonclient(
    key: str, triton_view: dict[str, Any]
) -> None:
    ours = SAMPLES[key]
    seen = triton_view["decoded"][key]
    assert seen["type"] == ours.DESCRIPTOR.full_name
    assert seen["unknown"] == [], "tritonclient did not recognise these fields"
    assert seen["dict"] == _as_dict(ours)
    # And what tritonclient re-encodes decodes back to the very same message here.
    assert type(ours).FromString(base64.b64decode(seen["data"])) == ours


def test_tritonclient_infer_result_reads_our_raw_outputs(triton_view: dict[str, Any]) -> None:
    got = triton_view["as_numpy"]
    assert got["OUTPUT0"] == {
        "dtype": "float32",
        "shape": [2, 2],
        "values": [1.0, -2.5, 3.25, 0.0],
    }
    assert got["LABELS"] == {"dtype": "object", "shape": [2], "values": [_b64(b"cat"), ""]}
    assert got["IDX"] == {"dtype": "int64", "shape": [3], "values": [5, -1, 2**40]}


def test_tritonclient_model_config_fields_read_by_perf_analyzer(
    triton_view: dict[str, Any],
) -> None:
    config = triton_view["decoded"]["ModelConfigResponse"]["dict"]["config"]
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["input"][0]["dims"] == ["3", "-1", "224"]
    assert config["dynamic_batching"]["preferred_batch_size"] == [8, 32]
    assert config["model_transaction_policy"] == {"decoupled": True}
    non_batching = triton_view["decoded"]["ModelConfigResponse(latest)"]["dict"]["config"]
    assert "max_batch_size" not in non_batching  # proto3 zero: the model does not batch
    assert "dynamic_batching" not in non_batching


def test_tritonclient_built_infer_request_decodes_with_ours(triton_view: dict[str, Any]) -> None:
    data = base64.b64decode(triton_view["from_triton"]["ModelInferRequest"])
    req = pb.ModelInferRequest.FromString(data)
    assert _unknown_field_paths(req, "") == []
    assert (req.model_name, req.model_version, req.id) == ("dense", "1", "r-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in req.inputs] == [
        ("INPUT0", "FP32", [2, 3]),
        ("TEXT", "BYTES", [2]),
    ]
    assert len(req.raw_input_contents) == 2
    fp32 = np.frombuffer(req.raw_input_contents[0], dtype="<f4").reshape(2, 3)
    np.testing.assert_array_equal(fp32, np.arange(6, dtype=np.float32).reshape(2, 3) / 4)
    assert req.raw_input_contents[1] == _bytes_tensor([b"hello", b"\x00\xff"])
    assert req.outputs[0].name == "OUTPUT0"
    assert req.outputs[0].parameters["classification"].int64_param == 2
    params = {k: (v.WhichOneof("parameter_choice"), v) for k, v in req.parameters.items()}
    assert params["sequence_id"][1].int64_param == 9
    assert params["sequence_start"][1].bool_param is True
    assert params["sequence_end"][0] == "bool_param"
    assert params["priority"][1].uint64_param == 3
    assert params["timeout"][1].int64_param == 1000
    assert params["custom_str"][1].string_param == "v"
    assert params["custom_float"][1].double_param == 0.5
    assert params["custom_bool"][1].bool_param is True


def test_tritonclient_built_load_request_decodes_with_ours(triton_view: dict[str, Any]) -> None:
    data = base64.b64decode(triton_view["from_triton"]["RepositoryModelLoadRequest"])
    req = pb.RepositoryModelLoadRequest.FromString(data)
    assert _unknown_field_paths(req, "") == []
    assert req.model_name == "dense"
    assert req.parameters["config"].string_param == "{}"
    assert req.parameters["file:1/model.onnx"].bytes_param == b"\x08\x01"
