"""Workflow files: {"slug", "name", "description", "graph" | "graph_file", "parameters"}; see the README."""

import json
from pathlib import Path

from tasks.models import Workflow
from tasks.params import validate_declarations
from tasks.validators import BindingError, check_tree

DEMO_DIR = Path(__file__).resolve().parent.parent / "workflows"


class WorkflowFileError(ValueError):
    pass


def read_workflow_file(path):
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkflowFileError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise WorkflowFileError(f"{path} is not a JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise WorkflowFileError(f"{path} must hold a JSON object.")
    if "graph_file" in data and "graph" not in data:
        try:
            data["graph"] = json.loads((path.parent / data.pop("graph_file")).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise WorkflowFileError(f"{path}: cannot read its graph_file: {exc}") from None
    problems = []
    for key in ("slug", "name"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            problems.append(f"{key} is required")
    problems += validate_declarations(data.get("graph"), data.get("parameters", []))
    try:
        check_tree(data)  # "\ud800" is valid JSON: it would be stored, and fail every page that shows it
    except BindingError as exc:
        problems += [f"{place} {sentence}" for place, sentence in exc.details.items()]
    if problems:
        raise WorkflowFileError(f"{path}: " + "; ".join(problems))
    return data


def load_workflow(path):
    """Create or update the workflow of a file, by slug; returns (workflow, created)."""
    data = read_workflow_file(path)
    return Workflow.objects.update_or_create(
        slug=data["slug"],
        defaults={
            "name": data["name"],
            "description": data.get("description", ""),
            "graph": data["graph"],
            "parameters": data.get("parameters", []),
        },
    )


def load_demo_workflows():
    return [load_workflow(path)[0] for path in sorted(DEMO_DIR.glob("*.json"))]
