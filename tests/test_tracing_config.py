"""Which OTEL_* settings turn tracing on, and how; refused values name the variable (no OpenTelemetry needed)."""

from __future__ import annotations

import pytest

from nnserve.server.tracing_config import DEFAULT_ROOT_RATIO, TracingConfigError, tracing_config

ENDPOINT = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}


@pytest.mark.parametrize("environ", [
    {},
    {"OTEL_SERVICE_NAME": "nnserve", "OTEL_TRACES_SAMPLER": "always_on"},  # configured, but nowhere to send
    {**ENDPOINT, "OTEL_SDK_DISABLED": "true"},
    {**ENDPOINT, "OTEL_TRACES_EXPORTER": "none"},
    {"OTEL_TRACES_EXPORTER": " "},
])
def test_tracing_stays_off_without_an_endpoint_or_exporter(environ: dict[str, str]) -> None:
    assert tracing_config(environ) is None


def test_an_endpoint_turns_tracing_on_with_the_documented_defaults() -> None:
    config = tracing_config(ENDPOINT)
    assert config is not None
    assert config.exporters == ("otlp",)
    assert config.protocol == "grpc"
    assert config.endpoint == "http://collector:4317"
    assert (config.sampler, config.ratio) == ("parentbased_traceidratio", DEFAULT_ROOT_RATIO)
    assert config.max_queue_size == 2048


def test_the_traces_specific_variables_win_over_the_general_ones() -> None:
    config = tracing_config({**ENDPOINT, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces:4318/v1/traces",
                             "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                             "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"})
    assert config is not None
    assert (config.protocol, config.endpoint) == ("http/protobuf", "https://traces:4318/v1/traces")


def test_http_protobuf_appends_the_traces_path_to_the_general_endpoint() -> None:
    config = tracing_config({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
                             "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert config is not None
    assert config.endpoint == "http://collector:4318/v1/traces"


def test_exporters_without_an_endpoint_use_the_sdk_defaults() -> None:
    config = tracing_config({"OTEL_TRACES_EXPORTER": "console,otlp"})
    assert config is not None
    assert config.exporters == ("console", "otlp")
    assert config.endpoint == "http://localhost:4317"


@pytest.mark.parametrize(("sampler", "argument", "expected"), [
    ("", "0.25", ("parentbased_traceidratio", 0.25)),
    ("parentbased_traceidratio", "", ("parentbased_traceidratio", 1.0)),  # the specification's default
    ("traceidratio", "0", ("traceidratio", 0.0)),
    ("always_on", "0.5", ("always_on", 1.0)),  # the argument only means something to the ratio samplers
    ("ParentBased_Always_Off", "", ("parentbased_always_off", 1.0)),
])
def test_samplers_and_their_ratio(sampler: str, argument: str, expected: tuple[str, float]) -> None:
    config = tracing_config({**ENDPOINT, "OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": argument})
    assert config is not None
    assert (config.sampler, config.ratio) == expected


@pytest.mark.parametrize(("environ", "named"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_TRACES_EXPORTER": "none,otlp"}, "OTEL_TRACES_EXPORTER"),
    ({**ENDPOINT, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER"),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({**ENDPOINT, "OTEL_TRACES_SAMPLER_ARG": "often"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({**ENDPOINT, "OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE"),
])
def test_values_that_cannot_be_honoured_are_refused_by_name(environ: dict[str, str], named: str) -> None:
    with pytest.raises(TracingConfigError, match=named):
        tracing_config(environ)
