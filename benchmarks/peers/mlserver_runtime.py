"""An MLServer runtime that runs an ONNX model with onnxruntime (MLServer 1.7 ships no ONNX runtime of its own).

Loaded by MLServer from the model folder's model-settings.json (`"implementation": "mlserver_runtime.OnnxModel"`);
runs in the benchmark's MLServer virtual environment, never in nnserve's. onnxruntime gets one intra-op thread per
CPU this process may use, as nnserve's sessions do (a server pinned to one core then runs no second thread on it).
"""

from __future__ import annotations

import os

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        self._session = ort.InferenceSession(self.settings.parameters.uri, options,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        (y,) = self._session.run(None, {self._input: x})
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output(self._output, y)])
