"""The seed documents' worked numbers, computed by the exported ONNX models in onnxruntime.

Where the documents round, the tolerance says so: they print 3 decimals (000, 001), and 001
rounds its softmax from already-rounded exponentials (it prints 0.538 where the exact value
is 0.5374).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx.reference import ReferenceEvaluator

from nnserve.builder import build, load_spec
from nnserve.builder.reference import forward

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
THREE_DECIMALS = 5e-4 + 1e-9  # a value printed with 3 decimals is within half a unit of the last place


def run_example(example: str, x: list[list[float]], tmp_path: Path) -> np.ndarray:
    result = build(EXAMPLES / example, tmp_path)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {result.spec.input_name: np.asarray(x, dtype=np.float32)})
    return output


def test_document_000_layer_of_three_neurons_gives_the_documents_outputs(tmp_path: Path) -> None:
    y = run_example("000_layer_4x3.json", [[1.00, 2.00, 3.00, 2.50]], tmp_path)
    np.testing.assert_allclose(y, [[4.800, 1.210, 2.385]], atol=THREE_DECIMALS)


def test_document_000_batch_of_three_samples_gives_the_documents_table(tmp_path: Path) -> None:
    batch = [[1.00, 2.00, 3.00, 2.50], [-0.80, 0.40, 0.10, 1.20], [0.20, 0.90, -0.50, 0.30]]
    y = run_example("000_layer_4x3.json", batch, tmp_path)
    expected = [[4.800, 1.210, 2.385], [3.310, 1.662, 1.661], [3.310, 2.001, 0.381]]
    np.testing.assert_allclose(y, expected, atol=THREE_DECIMALS)


def test_document_001_perceptron_gives_z_of_0_04(tmp_path: Path) -> None:
    y = run_example("001_perceptron.json", [[0.5, 1.2, -0.3]], tmp_path)
    np.testing.assert_allclose(y, [[0.04]], atol=1e-6)


def test_document_001_two_neuron_layer_clamps_the_negative_neuron(tmp_path: Path) -> None:
    y = run_example("001_layer_2x3.json", [[1.0, 2.0, -1.0]], tmp_path)
    np.testing.assert_allclose(y, [[0.1, 0.0]], atol=1e-6)


def test_document_001_two_layer_network_gives_the_documents_probabilities(tmp_path: Path) -> None:
    y = run_example("001_two_layer_softmax.json", [[1.5, -0.5]], tmp_path)
    # The document prints [0.538, 0.463]; exact softmax([0.74, 0.59]) is [0.53743, 0.46257].
    np.testing.assert_allclose(y, [[0.538, 0.463]], atol=1e-3)
    np.testing.assert_allclose(-np.log(y[0, 0]), 0.620, atol=1e-3)  # the document's loss


def test_document_001_network_parameter_count_is_17_not_the_14_the_document_claims() -> None:
    # Document 001 says "all 14 parameters (W1, b1, W2, b2)", but its own matrices hold
    # W1 3x2 = 6, b1 3, W2 2x3 = 6, b2 2: 17. We count what the network holds.
    network = load_spec(EXAMPLES / "001_two_layer_softmax.json")
    assert [layer.parameter_count for layer in network.layers] == [6 + 3, 6 + 2]
    assert network.parameter_count == 17


def test_document_001_four_sample_batch_hidden_layer_matches_the_document(tmp_path: Path) -> None:
    network = load_spec(EXAMPLES / "001_two_layer_softmax.json")
    hidden_only = {
        "name": "hidden_only",
        "input_size": 2,
        "weight_layout": "rows_are_neurons",
        "layers": [
            {
                "weights": network.layers[0].weights.T.tolist(),
                "bias": network.layers[0].bias.tolist(),
                "activation": "relu",
            }
        ],
    }
    result = build(hidden_only, tmp_path)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    x = np.array([[1.5, -0.5], [0.0, 1.0], [-1.0, 2.0], [0.5, 0.5]], dtype=np.float32)
    (a1,) = session.run(None, {"input": x})
    np.testing.assert_allclose(a1[0], [0.85, 0.0, 1.15], atol=1e-6)  # the document's worked A1
    w1 = np.array([[0.4, -0.3], [-0.2, 0.5], [0.8, 0.1]])
    np.testing.assert_allclose(a1, np.maximum(0, x @ w1.T + [0.1, -0.1, 0.0]), atol=1e-6)  # its numpy code


def test_document_001_full_network_on_the_four_sample_batch_matches_numpy(tmp_path: Path) -> None:
    x = [[1.5, -0.5], [0.0, 1.0], [-1.0, 2.0], [0.5, 0.5]]
    y = run_example("001_two_layer_softmax.json", x, tmp_path)
    np.testing.assert_allclose(y, forward(load_spec(EXAMPLES / "001_two_layer_softmax.json"), np.array(x)), atol=1e-6)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)


def test_document_002_complete_example_neuron_outputs_0_68(tmp_path: Path) -> None:
    np.testing.assert_allclose(run_example("002_single_neuron.json", [[0.5, 0.3, 0.8]], tmp_path), [[0.68]], atol=1e-6)


def test_document_002_exercise_1_outputs_1_9(tmp_path: Path) -> None:
    np.testing.assert_allclose(run_example("002_exercise1.json", [[2.0, -1.0, 0.5]], tmp_path), [[1.9]], atol=1e-6)


def test_document_002_exercise_2_rows_are_inputs_network_outputs_1_09(tmp_path: Path) -> None:
    np.testing.assert_allclose(run_example("002_exercise2.json", [[1.0, 0.5]], tmp_path), [[1.09]], atol=1e-6)


def test_document_002_exercise_2_hidden_layer_is_0_8_and_0_7() -> None:
    network = load_spec(EXAMPLES / "002_exercise2.json")
    hidden = np.maximum(0, np.array([1.0, 0.5]) @ network.layers[0].weights + network.layers[0].bias)
    np.testing.assert_allclose(hidden, [0.8, 0.7], atol=1e-12)


def test_document_002_and_gate_truth_table(tmp_path: Path) -> None:
    y = run_example("002_and_gate.json", [[1, 1], [0, 0], [1, 0], [0, 1]], tmp_path)[:, 0]
    # The document: 0.9975, 0.00005 (it rounds 4.54e-5), 0.12, 0.12.
    np.testing.assert_allclose(y[0], 0.9975, atol=5e-5)
    np.testing.assert_allclose(y[1], 0.00005, atol=1e-5)
    np.testing.assert_allclose(y[2:], [0.12, 0.12], atol=5e-3)
    assert list(y > 0.5) == [True, False, False, False]


def test_document_004_three_layer_network_matches_numpy_and_the_onnx_reference(tmp_path: Path) -> None:
    result = build(EXAMPLES / "004_three_layer.json", tmp_path)
    x = np.random.default_rng(4).standard_normal((16, 3)).astype(np.float32)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"input": x})
    (y_ref,) = ReferenceEvaluator(onnx.load(str(result.model_path))).run(None, {"input": x})
    np.testing.assert_allclose(y, forward(result.spec, x), atol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.json")))
def test_every_example_agrees_with_the_onnx_reference_evaluator(example: str, tmp_path: Path) -> None:
    result = build(EXAMPLES / example, tmp_path)
    x = np.random.default_rng(0).standard_normal((5, result.spec.input_size)).astype(np.float32)
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {result.spec.input_name: x})
    (y_ref,) = ReferenceEvaluator(onnx.load(str(result.model_path))).run(None, {result.spec.input_name: x})
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(y, forward(result.spec, x), atol=1e-5)
