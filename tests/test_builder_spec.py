"""Spec validation: every error names the file, the layer and the field, expected vs found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nnserve.builder import SpecError, load_spec, parse_spec
from nnserve.builder.spec import MAX_PROBLEMS_PER_FIELD


def one_layer(**layer: Any) -> dict[str, Any]:
    base = {"weights": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], "bias": [0.0, 0.0], "activation": "relu"}
    base.update(layer)
    return {"name": "net", "input_size": 3, "layers": [base]}


def error_of(document: Any, tmp_path: Path) -> SpecError:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(path) in str(info.value)
    return info.value


def test_shape_mismatch_between_consecutive_layers_names_the_layer_and_both_shapes(tmp_path: Path) -> None:
    doc = one_layer()
    doc["layers"].append({"weights": [[1.0, 2.0, 3.0]], "bias": [0.0], "activation": "linear"})
    err = error_of(doc, tmp_path)
    assert "layer 1, field 'weights'" in str(err)
    assert "receives 2 inputs" in str(err)
    assert "(1, 3)" in str(err)


def test_ragged_rows_name_the_row(tmp_path: Path) -> None:
    err = error_of(one_layer(weights=[[1.0, 2.0, 3.0], [4.0, 5.0]]), tmp_path)
    assert "layer 0, field 'weights', row 1" in str(err)
    assert "expected 3 values" in str(err)
    assert "found 2" in str(err)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_weights_are_rejected_with_their_index(bad: str, tmp_path: Path) -> None:
    text = json.dumps(one_layer()).replace("5.0", bad)
    err = error_of(text, tmp_path)
    assert "layer 0, field 'weights'" in str(err)
    assert "finite" in str(err)
    assert "(1, 1)" in str(err)


def test_unknown_activation_lists_the_allowed_ones(tmp_path: Path) -> None:
    err = error_of(one_layer(activation="swish"), tmp_path)
    assert "layer 0, field 'activation'" in str(err)
    assert "'swish'" in str(err)
    assert "gelu_tanh" in str(err)


def test_unknown_layer_key_is_rejected(tmp_path: Path) -> None:
    err = error_of(one_layer(dropout=0.5), tmp_path)
    assert "layer 0, field 'dropout'" in str(err)
    assert "unknown key" in str(err)


def test_unknown_top_level_key_is_rejected(tmp_path: Path) -> None:
    doc = one_layer()
    doc["optimizer"] = "adam"
    assert "field 'optimizer'" in str(error_of(doc, tmp_path))


def test_bias_length_must_match_neurons(tmp_path: Path) -> None:
    err = error_of(one_layer(bias=[0.0, 0.0, 0.0]), tmp_path)
    assert "layer 0, field 'bias'" in str(err)
    assert "expected 2 values" in str(err)


def test_scalar_bias_with_several_neurons_is_rejected(tmp_path: Path) -> None:
    assert "scalar bias fits one neuron" in str(error_of(one_layer(bias=0.5), tmp_path))


def test_invalid_json_is_reported_with_the_file(tmp_path: Path) -> None:
    assert "not valid JSON" in str(error_of("{not json", tmp_path))


def test_wrong_format_version_is_rejected(tmp_path: Path) -> None:
    doc = one_layer()
    doc["format"] = "nnserve.network/v9"
    assert "field 'format'" in str(error_of(doc, tmp_path))


def test_square_weights_without_a_stated_layout_are_rejected_not_guessed(tmp_path: Path) -> None:
    doc = {
        "name": "sq",
        "input_size": 2,
        "layers": [{"weights": [[0.6, 0.4], [0.2, 0.8]], "bias": [0.1, -0.1], "activation": "relu"}],
    }
    err = error_of(doc, tmp_path)
    assert "layer 0, field 'weight_layout'" in str(err)
    assert "square" in str(err)


def test_square_weights_follow_the_stated_layout() -> None:
    w = [[0.6, 0.4], [0.2, 0.8]]
    layer = {"weights": w, "bias": [0.0, 0.0], "activation": "linear"}
    by_inputs = parse_spec({"name": "a", "input_size": 2, "weight_layout": "rows_are_inputs", "layers": [layer]})
    by_neurons = parse_spec({"name": "b", "input_size": 2, "weight_layout": "rows_are_neurons", "layers": [layer]})
    np.testing.assert_array_equal(by_inputs.layers[0].weights, np.array(w))
    np.testing.assert_array_equal(by_neurons.layers[0].weights, np.array(w).T)


def test_weights_that_fit_only_the_other_layout_get_a_hint(tmp_path: Path) -> None:
    doc = {
        "name": "n",
        "input_size": 3,
        "layers": [{"weights": [[1, 2], [3, 4], [5, 6]], "bias": [0, 0], "activation": "relu"}],
    }
    err = error_of(doc, tmp_path)
    assert "rows_are_inputs" in str(err)


def test_default_layout_is_rows_are_neurons() -> None:
    net = parse_spec(one_layer())
    assert net.layers[0].weights.shape == (3, 2)  # normalised (inputs, outputs)
    np.testing.assert_array_equal(net.layers[0].weights[:, 0], [1.0, 2.0, 3.0])


def test_one_dimensional_weights_with_scalar_bias_are_one_neuron() -> None:
    net = parse_spec(
        {"name": "n", "input_size": 3, "layers": [{"weights": [1, 2, 3], "bias": 0.5, "activation": "linear"}]}
    )
    assert net.output_size == 1
    assert net.parameter_count == 4


def test_npy_weights_are_loaded_from_beside_the_spec(tmp_path: Path) -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.save(tmp_path / "w.npy", w)
    (tmp_path / "net.json").write_text(json.dumps(one_layer(weights={"npy": "w.npy"})))
    net = load_spec(tmp_path / "net.json")
    np.testing.assert_array_equal(net.layers[0].weights, w.T)


def test_npy_reference_outside_the_spec_folder_is_refused(tmp_path: Path) -> None:
    err = error_of(one_layer(weights={"npy": "../w.npy"}), tmp_path)
    assert "relative to the spec's folder" in str(err)


def test_missing_npy_file_is_reported(tmp_path: Path) -> None:
    err = error_of(one_layer(weights={"npy": "missing.npy"}), tmp_path)
    assert "layer 0, field 'weights'" in str(err)
    assert "missing.npy" in str(err)


def test_exact_gelu_in_float64_is_refused_because_onnxruntime_lacks_the_kernel(tmp_path: Path) -> None:
    doc = one_layer(activation="gelu")
    doc["dtype"] = "float64"
    assert "layer 0, field 'activation'" in str(error_of(doc, tmp_path))


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 200])
def test_model_names_must_be_plain(name: str, tmp_path: Path) -> None:
    doc = one_layer()
    doc["name"] = name
    assert "field 'name'" in str(error_of(doc, tmp_path))


def test_a_non_number_in_a_weight_vector_names_the_element_and_what_it_is(tmp_path: Path) -> None:
    doc = {"name": "n", "input_size": 2, "layers": [{"weights": [0.4, "a"], "bias": 0.1, "activation": "relu"}]}
    err = error_of(doc, tmp_path)
    assert str(err).endswith("layer 0, field 'weights', element 1: expected a number, found a string (\"a\")")
    assert "row" not in str(err)


def test_a_non_number_in_a_matrix_names_its_row_and_element(tmp_path: Path) -> None:
    err = error_of(one_layer(weights=[[1.0, 2.0, 3.0], [4.0, None, True]]), tmp_path)
    assert [p.where for p in err.problems] == [
        "layer 0, field 'weights', row 1, element 1", "layer 0, field 'weights', row 1, element 2"]
    assert [p.detail for p in err.problems] == [
        "expected a number, found null", "expected a number, found a boolean (true)"]


def test_a_number_among_matrix_rows_is_named_as_a_row(tmp_path: Path) -> None:
    err = error_of(one_layer(weights=[[1.0, 2.0, 3.0], 0.5]), tmp_path)
    assert "layer 0, field 'weights', row 1: expected a row (a list of numbers) like the other rows, found a number" \
        in str(err)


def test_a_missing_input_size_is_reported_as_a_missing_required_field(tmp_path: Path) -> None:
    doc = one_layer()
    del doc["input_size"]
    err = error_of(doc, tmp_path)
    assert err.problems == (err,)
    assert str(err).endswith(
        "field 'input_size': required but missing: the number of input features (a positive integer)")
    assert "None" not in str(err)


def test_every_independent_problem_of_a_spec_is_reported_at_once(tmp_path: Path) -> None:
    doc = {
        "name": "n",
        "input_size": 3,
        "dtype": "float8",
        "optimizer": "adam",
        "layers": [
            {"weights": [[1, 2, 3], [4, 5, 6]], "bias": [0, 0, 0], "activation": "swish"},
            {"weights": [1, "x"], "bias": 0, "activation": "linear", "dropout": 0.5},
            {"weights": [[1, 2, 3]], "bias": [0], "activation": "linear"},
        ],
    }
    err = error_of(doc, tmp_path)
    assert [p.where for p in err.problems] == [
        "field 'optimizer'",
        "field 'dtype'",
        "layer 0, field 'activation'",
        "layer 0, field 'bias'",  # the weights parse and fit: 2 neurons, so 3 biases are wrong
        "layer 1, field 'dropout'",
        "layer 1, field 'weights', element 1",
        # layer 2 is not shape-checked: layer 1's weights did not parse, so its input width is unknown
    ]
    assert all(p.source == str(tmp_path / "spec.json") for p in err.problems)
    assert str(err).count("\n") == len(err.problems) - 1  # one line per problem, each naming the file


def test_shape_checks_wait_for_the_weights_to_parse(tmp_path: Path) -> None:
    err = error_of(one_layer(weights=[[1.0, "2"], [3.0]], bias=[0.0, 0.0, 0.0, 0.0]), tmp_path)
    assert [p.where for p in err.problems] == ["layer 0, field 'weights', row 0, element 1",
                                               "layer 0, field 'weights', row 1"]  # ragged; no bias length check


def test_a_layer_after_a_shape_error_is_checked_against_no_guessed_width(tmp_path: Path) -> None:
    doc = one_layer(weights=[[1.0, 2.0], [3.0, 4.0]], weight_layout="rows_are_neurons")  # needs 3 inputs
    doc["layers"].append({"weights": [[1.0, 2.0, 3.0, 4.0, 5.0]], "bias": [0.0], "activation": "sigmoid"})
    err = error_of(doc, tmp_path)
    assert [p.where for p in err.problems] == ["layer 0, field 'weights'"]


def test_element_problems_of_one_field_are_capped(tmp_path: Path) -> None:
    err = error_of(one_layer(weights=[["w"] * 3] * 4), tmp_path)
    assert len(err.problems) == MAX_PROBLEMS_PER_FIELD + 1
    more = 12 - MAX_PROBLEMS_PER_FIELD
    assert err.problems[-1].line.endswith(f"field 'weights': {more} more problems like the ones above")
