"""
Workflow parameters: what a user may set, and how each value lands on a node input of the graph.

A declaration is a dict: {"name", "type", "node", "input", optional "label", "help", "default", "required",
"min", "max", "step", "choices", "multiline"}. Types: text, int, float, seed, choice, color, image.

A value left out takes the declared default. A value sent empty ("") is refused unless the declaration says
`"required": false`: an emptied prompt is a mistake to point out, not a reason to run the default prompt. A colour
is a 24-bit number (what ComfyUI's EmptyImage takes), given as a number or as "#rrggbb". A number with a "step"
must be min + k × step (0 + k × step without a min), as the browser's number field asks.
"""

import copy
import math
import re
import secrets
import uuid

from tasks.validators import BindingError, printable, text_problem

PARAMETER_TYPES = ("text", "int", "float", "seed", "choice", "color", "image")
COLOR_MAX = 0xFFFFFF
HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
SEED_MAX = 2**64 - 1  # ComfyUI's KSampler accepts 0 .. 0xffffffffffffffff
MAX_TEXT = 10_000
# Node inputs that name a file in a server's input or output folder, which every user of that server shares: only
# an upload (a name the hub made) may go there, through an "image" parameter, never a name a user typed.
FILE_INPUT_NAMES = frozenset({"image", "video", "audio", "file", "model_file", "latent"})  # on nodes named Load*
FILE_INPUTS = frozenset(
    {
        ("VHS_LoadVideo", "video"),
        ("VHS_LoadVideoPath", "video"),
        ("VHS_LoadAudio", "audio_file"),
        ("VHS_LoadImagePath", "image"),
        ("VHS_LoadImages", "directory"),
        ("VHS_LoadImagesPath", "directory"),
    }
)


def names_server_file(node, input_name):
    """Whether input `input_name` of `node` names a file on the server (LoadImage's image and the like)."""
    class_type = node.get("class_type") if isinstance(node, dict) else None
    if not isinstance(class_type, str) or not isinstance(input_name, str):
        return False
    return (class_type, input_name) in FILE_INPUTS or (
        class_type.startswith("Load") and input_name in FILE_INPUT_NAMES
    )


def validate_declarations(graph, parameters):
    """Check a workflow file's graph and parameters; returns a list of problems (empty when fine)."""
    problems = []
    if not isinstance(graph, dict) or not graph:
        return ["graph must be a non-empty object of nodes in ComfyUI's API format"]
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            problems.append(f"node {node_id} has no class_type")
        elif not isinstance(node.get("inputs", {}), dict):
            problems.append(f"node {node_id} has inputs that are not an object")
    if not isinstance(parameters, list):
        return [*problems, "parameters must be a list"]
    seen = set()
    for index, param in enumerate(parameters):
        where = f"parameter {index + 1}"
        if not isinstance(param, dict):
            problems.append(f"{where} is not an object")
            continue
        name = param.get("name")
        if not isinstance(name, str) or not name.isidentifier():
            problems.append(f"{where} needs a name made of letters, digits and underscores")
            continue
        where = f"parameter {name!r}"
        if name in seen:
            problems.append(f"{where} is declared twice")
        seen.add(name)
        if param.get("type") not in PARAMETER_TYPES:
            problems.append(
                f"{where} has type {param.get('type')!r}; use one of {', '.join(PARAMETER_TYPES)}"
            )
        node = graph.get(str(param.get("node")))
        if not isinstance(node, dict):
            problems.append(f"{where} points at node {param.get('node')!r}, which the graph does not have")
        elif param.get("input") not in (node.get("inputs") or {}):
            problems.append(
                f"{where} points at input {param.get('input')!r}, which node {param.get('node')} lacks"
            )
        elif param.get("type") != "image" and names_server_file(node, param.get("input")):
            problems.append(
                f"{where} lets users type the {param.get('input')} of {node['class_type']} (node "
                f"{param.get('node')}), a file name on the server: declare it with type image, so that only "
                "the user's own uploads can go there"
            )
        if param.get("type") == "choice" and not (
            isinstance(param.get("choices"), list) and param["choices"]
        ):
            problems.append(f"{where} is a choice without a list of choices")
        for bound in ("min", "max"):
            if bound in param and not _is_number(param[bound]):
                problems.append(f"{where} has a {bound} that is not a number")
        if "step" in param and not (_is_number(param["step"]) and param["step"] > 0):
            problems.append(f"{where} has a step that is not a positive number")
    return problems


def _is_number(value):
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float: JSON allows 10**400
        return False


def _clean(param, value):
    """Return the typed value or raise ValueError with a sentence for the user."""
    kind = param["type"]
    if kind == "text":
        if not isinstance(value, str):
            raise ValueError("must be text")
        if len(value) > param.get("max_length", MAX_TEXT):
            raise ValueError(f"must be at most {param.get('max_length', MAX_TEXT)} characters")
        problem = text_problem(value)
        if problem:
            raise ValueError(problem)
        return value
    if kind in ("int", "seed"):
        if isinstance(value, str):
            # int() refuses some characters isdigit() accepts ("²") and more than 4,300 digits.
            try:
                value = int(value.strip()) if value.strip().lstrip("-").isdecimal() else value
            except ValueError:
                raise ValueError("must be a whole number") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("must be a whole number")
        low, high = (0, SEED_MAX) if kind == "seed" else (param.get("min"), param.get("max"))
        _check_range(value, low, high)
        if kind == "int":
            _check_step(value, param)
        return value
    if kind == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number") from None
        if not _is_number(value):
            raise ValueError("must be a number")
        # Check the float that lands in the graph: a large int can round past the bound when converted.
        value = float(value)
        _check_range(value, param.get("min"), param.get("max"))
        _check_step(value, param)
        return value
    if kind == "choice":
        if value not in param["choices"]:
            raise ValueError(f"must be one of {', '.join(map(str, param['choices']))}")
        return value
    if kind == "color":
        if isinstance(value, str) and HEX_COLOR.fullmatch(value):
            return int(value[1:], 16)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COLOR_MAX:
            return value
        raise ValueError("must be a colour: #rrggbb, or a number from 0 to 16777215")
    if kind == "image":
        try:
            return str(uuid.UUID(str(value)))
        except ValueError:
            raise ValueError("must be the id of one of your uploads") from None
    raise ValueError(f"has an unknown type {kind!r}")


def _check_range(value, low, high):
    if low is not None and value < low:
        raise ValueError(f"must be at least {low}")
    if high is not None and value > high:
        raise ValueError(f"must be at most {high}")


def _check_step(value, param):
    step = param.get("step")
    if not _is_number(step) or step <= 0:
        return
    base = param.get("min") if _is_number(param.get("min")) else 0
    if isinstance(value, int) and isinstance(base, int) and isinstance(step, int):
        off = (value - base) % step  # exact, however large the numbers
    else:
        try:
            off = math.remainder(value - base, step)  # as Django's StepValueValidator judges floats
        except OverflowError:
            raise ValueError(f"is too large to be checked against its step of {step}") from None
        if math.isclose(off, 0, abs_tol=1e-9):
            return
        off %= step
    if off == 0:
        return
    start = f"a multiple of {step}" if base == 0 else f"{base} plus a multiple of {step}"
    below, above = value - off, value - off + step
    if isinstance(below, float):
        below, above = round(below, 10), round(above, 10)
    raise ValueError(f"must be {start} ({below} or {above}, for instance)")


def label_of(param):
    """The label a declaration shows: its own, else its name in words ("blur_radius" → "Blur radius")."""
    return param.get("label") or param["name"].replace("_", " ").capitalize()


def is_multiline(param):
    """Whether a text parameter takes paragraphs: declared so, or a prompt."""
    return param["type"] == "text" and bool(param.get("multiline") or param["name"] in ("prompt", "negative"))


def describe(param):
    """
    A declaration as an API user needs it to fill it in, without the node and input it lands on. `required`: the
    task cannot be made without a value (no default, no random seed); `default` null for a seed drawn at random.
    """
    kind = param["type"]
    seed = kind == "seed"
    random_seed = seed and (param.get("random") is not False or param.get("default") is None)  # as bind() does
    has_default = "default" in param and not random_seed
    return {
        "name": param["name"],
        "label": label_of(param),
        "type": kind,
        "default": param["default"] if has_default else None,
        "random": random_seed,
        "min": 0 if seed else param.get("min"),
        "max": SEED_MAX if seed else param.get("max"),
        "step": param.get("step") if kind in ("int", "float") else None,
        "choices": param.get("choices") if kind == "choice" else None,
        "max_length": param.get("max_length", MAX_TEXT) if kind == "text" else None,
        "required": not (seed or has_default) and param.get("required", True) is not False,
        "multiline": is_multiline(param),
        "help": param.get("help", ""),
    }


def color_hex(value):
    """A colour parameter's value as the browser's colour field shows it: #rrggbb."""
    try:
        return f"#{int(value) & COLOR_MAX:06x}"
    except (TypeError, ValueError):
        return "#000000"


def bind(graph, parameters, inputs, find_upload):
    """
    Apply `inputs` to a copy of `graph`. `find_upload(id)` returns the caller's own Upload or None.
    Returns (graph, cleaned inputs, image inputs [{"node", "input", "upload"}]); raises BindingError.
    """
    if not isinstance(inputs, dict):
        raise BindingError("The inputs must be an object.", {"inputs": "must be an object of parameter values"})
    declared = {param["name"]: param for param in parameters}
    errors = {printable(str(name)): "is not a parameter of this workflow" for name in inputs if name not in declared}
    graph = copy.deepcopy(graph)
    cleaned, images = {}, []
    for name, param in declared.items():
        if param["type"] != "image" and names_server_file(graph.get(str(param["node"])), param["input"]):
            # A workflow stored before validate_declarations refused this: a typed name could read another's file.
            errors[name] = (
                "names a file on the server, where only your uploads may go; an operator must declare it as an image"
            )
            continue
        value = inputs.get(name)
        if value == "" and param["type"] != "seed":
            if param.get("required", True):
                errors[name] = "must not be empty"
                continue
            if param["type"] != "text":
                continue  # an optional number or choice left empty: the graph keeps its own value
        elif value is None or value == "":
            if param["type"] == "seed":
                value = param.get("default") if param.get("random") is False else None
                if value is None:
                    value = secrets.randbelow(2**48)
            elif "default" in param:
                value = param["default"]
            elif param.get("required", True):
                errors[name] = "is required"
                continue
            else:
                continue
        try:
            value = _clean(param, value)
        except ValueError as exc:
            errors[name] = str(exc)
            continue
        if param["type"] == "image":
            upload = find_upload(value)
            if upload is None:
                errors[name] = "must be the id of one of your uploads"
                continue
            images.append({"node": str(param["node"]), "input": param["input"], "upload": value})
            graph[str(param["node"])]["inputs"][param["input"]] = upload.remote_name
        else:
            graph[str(param["node"])]["inputs"][param["input"]] = value
        cleaned[name] = value
    if errors:
        raise BindingError("Some inputs are not valid for this workflow.", errors)
    return graph, cleaned, images
