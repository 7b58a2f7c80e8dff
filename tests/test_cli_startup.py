"""The `nnserve` command imports only what the command being run needs: `--version` and `--help` nothing heavy,
`infer` grpc and numpy but never onnx or onnxruntime (the builder's and the server's), so that every call does not
pay for them. Checked with `python -X importtime`, which lists every module a process imported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from nnserve.cli import SUBCOMMANDS, build_parser
from tests.conftest import DENSE_B, DENSE_W, dense_model, running_server, write_model

pytestmark = pytest.mark.timeout(120)

HEAVY = ("onnx", "onnxruntime", "ml_dtypes")


def _imported(*argv: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The top-level modules `python -X importtime -m nnserve ARGV` imported, and the finished process."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "nnserve", *argv], capture_output=True,
                          text=True, timeout=60)
    names = {match.group(1).split(".")[0]
             for match in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", done.stderr, re.MULTILINE)}
    assert "argparse" in names, done.stderr[-2000:]  # the listing itself works
    return names, done


def test_version_and_help_import_no_subcommand_module() -> None:
    for argv in (["--version"], ["--help"]):
        names, done = _imported(*argv)
        assert done.returncode == 0, done.stderr[-2000:]
        assert not names & {*HEAVY, "numpy", "grpc", "google"}, sorted(names & {*HEAVY, "numpy", "grpc", "google"})
    assert done.stdout.startswith("usage: nnserve")
    for name in SUBCOMMANDS:  # --help still lists every command
        assert name in done.stdout


def test_infer_help_and_an_infer_call_load_neither_onnx_nor_onnxruntime(tmp_path: Path) -> None:
    names, done = _imported("infer", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--data" in done.stdout
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
    write_model(tmp_path, "dense", dense_model(DENSE_W, DENSE_B))
    with running_server(tmp_path) as server:
        names, done = _imported("infer", "dense", "--data", "[[1, 2, 3]]", "--url", server.address)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "output  FP32  shape [1, 2]" in done.stdout
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
    assert {"grpc", "numpy"} <= names


def test_build_parser_without_a_command_still_knows_every_subcommands_flags() -> None:
    """Callers that parse a full command line from Python (the deploy tests parse the manifests' args) get all."""
    args = build_parser().parse_args(["serve", "--model-repository", "m", "--port-file", "p.json"])
    assert (args.command, args.port_file) == ("serve", "p.json")
    assert build_parser().parse_args(["infer", "x", "--data", "[1]"]).data == "[1]"
    only_infer = build_parser(["infer"])
    assert only_infer.parse_args(["infer", "x", "--data", "[1]"]).model == "x"
    with pytest.raises(SystemExit):
        only_infer.parse_args(["serve", "--model-repository", "m"])  # serve's flags were not loaded
