"""
Workflow parameter binding under generated declarations and arbitrary JSON inputs: bind() returns a graph that
differs from the workflow's only at declared inputs, with values that respect their declarations, or raises
BindingError with a sentence per field, and never touches the workflow's own graph.
"""

import copy
import math
import uuid

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tasks.params import SEED_MAX, BindingError, bind, validate_declarations

FUZZ = settings(max_examples=600, deadline=None, database=None)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)
# A graph's own values never hold NaN (ComfyUI's JSON has none), so that graphs compare equal to their copies.
graph_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
steps = st.integers(1, 100) | st.floats(min_value=0.001, max_value=100)  # declarations refuse the others
bounds = (
    st.integers(-100, 100)
    | st.integers(-(2**1000), 2**1000)  # beyond about 2**1023 an int is no float, and declarations refuse it
    | st.integers(min_value=2**52, max_value=2**64)
    | st.floats(allow_nan=False, allow_infinity=False)
)
names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True)
UPLOADS = [str(uuid.UUID(int=n)) for n in (1, 2, 3)]


class Upload:
    def __init__(self, pk):
        self.remote_name = f"comfyhub-{pk}.png"


def find_upload(pk):
    return Upload(pk) if pk in UPLOADS else None


graphs = st.dictionaries(
    st.text(min_size=1, max_size=4) | st.integers(0, 30).map(str),
    st.fixed_dictionaries(
        {
            "class_type": st.text(max_size=10),
            "inputs": st.dictionaries(st.text(max_size=8), graph_values, min_size=1, max_size=4),
        }
    ),
    min_size=1,
    max_size=5,
)


@st.composite
def declaration(draw, graph, name):
    node = draw(st.sampled_from(sorted(graph)))
    numeric = node.isascii() and node.isdigit() and str(int(node)) == node
    kind = draw(st.sampled_from(["text", "int", "float", "seed", "choice", "color", "image"]))
    param = {
        "name": name,
        "type": kind,
        "node": int(node) if numeric and draw(st.booleans()) else node,  # as README's "node": 3 or "3"
        "input": draw(st.sampled_from(sorted(graph[node]["inputs"]))),
    }
    optional = {"label": st.text(max_size=10), "help": st.text(max_size=10), "required": st.booleans()}
    if kind in ("int", "float"):
        optional |= {"min": bounds, "max": bounds, "step": steps}
    if kind == "text":
        optional |= {"max_length": st.integers(0, 20), "multiline": st.booleans()}
    if kind == "seed":
        optional |= {"random": st.booleans()}
    if kind == "choice":
        param["choices"] = draw(st.lists(json_scalars | st.text(max_size=6), min_size=1, max_size=4))
    optional["default"] = values_for(param) | json_values
    for key, strategy in optional.items():
        if draw(st.booleans()):
            param[key] = draw(strategy)
    return param


def values_for(param):
    """Values a user could plausibly send for this parameter, and their near misses."""
    kind = param["type"]
    if kind == "text":
        return st.text(max_size=30)
    if kind in ("int", "seed", "float"):
        numbers = (
            st.integers(-10, 10**3)
            | st.integers(min_value=SEED_MAX - 2, max_value=SEED_MAX + 2)
            | st.integers(min_value=-(10**400), max_value=10**400)
            | st.floats(allow_nan=True, allow_infinity=True)
        )
        return numbers | numbers.map(str) | st.from_regex(r"\s*-{0,2}[0-9²³¹٣]{1,6}\s*", fullmatch=True)
    if kind == "choice":
        return st.sampled_from(param["choices"]) | json_scalars
    if kind == "color":
        return st.integers(-2, 2**24 + 1) | st.from_regex(r"#[0-9a-fA-FgG]{5,7}", fullmatch=True) | st.text(max_size=8)
    return st.sampled_from(UPLOADS) | st.uuids().map(str) | st.sampled_from(UPLOADS).map(str.upper) | st.text()


@st.composite
def workflows(draw):
    graph = draw(graphs)
    param_names = draw(st.lists(names, unique=True, max_size=6))
    parameters = [draw(declaration(graph, name)) for name in param_names]
    return graph, parameters


@st.composite
def cases(draw):
    graph, parameters = draw(workflows())
    inputs = {}
    for param in parameters:
        if draw(st.integers(0, 9)) < 8:
            inputs[param["name"]] = draw(values_for(param) | st.sampled_from([None, ""]) | json_values)
    inputs |= draw(st.dictionaries(st.text(max_size=6), json_values, max_size=2))
    return graph, parameters, draw(st.sampled_from([inputs]) | json_values)


def respects(param, value):
    kind = param["type"]
    low, high = param.get("min"), param.get("max")
    if kind == "text":
        return isinstance(value, str) and len(value) <= param.get("max_length", 10_000)
    if kind == "int":
        whole = isinstance(value, int) and not isinstance(value, bool)
        return whole and in_range(value, low, high) and on_step(param, value)
    if kind == "float":
        finite = isinstance(value, float) and math.isfinite(value)
        return finite and in_range(value, low, high) and on_step(param, value)
    if kind == "color":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFFFF
    if kind == "seed":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX
    if kind == "choice":
        return value in param["choices"]
    return value in UPLOADS


def on_step(param, value):
    if "step" not in param:
        return True
    base, step = param.get("min", 0), param["step"]
    if all(isinstance(number, int) for number in (value, base, step)):
        return (value - base) % step == 0
    return math.isclose(math.remainder(value - base, step), 0, abs_tol=1e-9)


def in_range(value, low, high):
    return (low is None or value >= low) and (high is None or value <= high)


@FUZZ
@given(cases())
@example(
    ({"1": {"class_type": "K", "inputs": {"cfg": 1}}}, [{"name": "cfg", "type": "float", "node": "1", "input": "cfg"}],
     {"cfg": 10**400}),
)
@example(
    ({"1": {"class_type": "K", "inputs": {"n": 1}}}, [{"name": "n", "type": "int", "node": "1", "input": "n"}],
     {"n": "²"}),
)
@example(
    ({"1": {"class_type": "K", "inputs": {"x": 1}}},
     [{"name": "x", "type": "float", "node": "1", "input": "x", "max": 2**54 - 1}], {"x": 2**54 - 1}),
)
def test_binding_returns_a_bound_copy_or_a_binding_error(case):
    graph, parameters, inputs = case
    assert validate_declarations(graph, parameters) == [], "the generator made an invalid workflow"
    original_graph, original_parameters = copy.deepcopy(graph), copy.deepcopy(parameters)
    try:
        bound, cleaned, images = bind(graph, parameters, inputs, find_upload)
    except BindingError as exc:
        assert exc.details, "a BindingError names the fields at fault"
        for field, sentence in exc.details.items():
            assert isinstance(field, str) and isinstance(sentence, str)
            assert sentence.startswith(("must ", "is ", "has ")), f"{field}: {sentence!r} is not for a user"
    else:
        declared = {param["name"]: param for param in parameters}
        assert set(cleaned) <= set(declared)
        expected = copy.deepcopy(original_graph)
        for name, param in declared.items():
            if name not in cleaned:
                continue
            assert respects(param, cleaned[name]), f"{name}={cleaned[name]!r} breaks {param}"
            value = find_upload(cleaned[name]).remote_name if param["type"] == "image" else cleaned[name]
            expected[str(param["node"])]["inputs"][param["input"]] = value
        assert bound == expected, "the graph changed somewhere no parameter points"
        assert images == [
            {"node": str(declared[name]["node"]), "input": declared[name]["input"], "upload": cleaned[name]}
            for name in declared
            if name in cleaned and declared[name]["type"] == "image"
        ]
    assert graph == original_graph, "bind() changed the workflow's own graph"
    assert parameters == original_parameters, "bind() changed the workflow's declarations"
