import pytest

from tasks.params import BindingError, bind, validate_declarations

GRAPH = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "color": 0}},
    "2": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
    "3": {"class_type": "KSampler", "inputs": {"seed": 1, "cfg": 8.0, "sampler_name": "euler"}},
}
PARAMS = [
    {"name": "width", "type": "int", "node": "1", "input": "width", "min": 8, "max": 128, "default": 64},
    {"name": "cfg", "type": "float", "node": "3", "input": "cfg", "min": 1, "max": 30},
    {"name": "sampler", "type": "choice", "node": "3", "input": "sampler_name", "choices": ["euler", "ddim"]},
    {"name": "seed", "type": "seed", "node": "3", "input": "seed"},
]


class FakeUpload:
    remote_name = "comfyhub-abc.png"


def test_it_binds_values_onto_a_copy_of_the_graph():
    graph, cleaned, images = bind(
        GRAPH, PARAMS, {"width": "32", "cfg": 2.5, "sampler": "ddim", "seed": 7}, None
    )
    assert graph["1"]["inputs"]["width"] == 32
    assert graph["3"]["inputs"] == {"seed": 7, "cfg": 2.5, "sampler_name": "ddim"}
    assert GRAPH["1"]["inputs"]["width"] == 64
    assert cleaned == {"width": 32, "cfg": 2.5, "sampler": "ddim", "seed": 7}
    assert images == []


def test_a_missing_required_value_is_an_error():
    with pytest.raises(BindingError) as caught:
        bind(GRAPH, PARAMS, {"width": 10}, None)
    assert caught.value.details == {"cfg": "is required", "sampler": "is required"}


@pytest.mark.parametrize(
    ("inputs", "field", "message"),
    [
        ({"width": 4}, "width", "must be at least 8"),
        ({"width": 1.5}, "width", "must be a whole number"),
        ({"width": True}, "width", "must be a whole number"),
        ({"cfg": "abc"}, "cfg", "must be a number"),
        ({"cfg": float("nan")}, "cfg", "must be a number"),
        ({"seed": -1}, "seed", "must be at least 0"),
        ({"seed": 2**64}, "seed", f"must be at most {2**64 - 1}"),
    ],
)
def test_bad_values_get_a_sentence(inputs, field, message):
    with pytest.raises(BindingError) as caught:
        bind(GRAPH, PARAMS, {"cfg": 2, "sampler": "euler", **inputs}, None)
    assert caught.value.details[field] == message


def test_image_parameters_use_the_uploads_unique_name():
    params = [{"name": "image", "type": "image", "node": "2", "input": "image"}]
    upload_id = "6f1b1a3e-4c1e-4f43-9a55-0d7b7d2d8d11"
    graph, _, images = bind(GRAPH, params, {"image": upload_id}, lambda pk: FakeUpload())
    assert graph["2"]["inputs"]["image"] == "comfyhub-abc.png"
    assert images == [{"node": "2", "input": "image", "upload": upload_id}]
    with pytest.raises(BindingError):
        bind(GRAPH, params, {"image": upload_id}, lambda pk: None)


def test_declarations_are_checked_against_the_graph():
    problems = validate_declarations(
        GRAPH,
        [
            {"name": "w", "type": "int", "node": "9", "input": "width"},
            {"name": "c", "type": "colour", "node": "1", "input": "nope"},
            {"name": "s", "type": "choice", "node": "3", "input": "sampler_name"},
        ],
    )
    assert "parameter 'w' points at node '9', which the graph does not have" in problems
    assert any("type 'colour'" in p for p in problems)
    assert "parameter 'c' points at input 'nope', which node 1 lacks" in problems
    assert "parameter 's' is a choice without a list of choices" in problems
