"""The OpenAPI document is valid and lists exactly the routes and methods the Flask app serves."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Rule

from nodefoundry_server import config as config_module
from nodefoundry_server.api import create_app
from nodefoundry_server.api.openapi import document
from nodefoundry_server.store import Store

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
IGNORED_METHODS = {"HEAD", "OPTIONS"}
# Flask converter arguments whose OpenAPI parameter has another name.
PARAMETER_NAMES = {"subpath": "path"}
_CONVERTER = re.compile(r"<(?:[a-z]+(?:\([^)]*\))?:)?([A-Za-z_][A-Za-z0-9_]*)>")


def _raw_document() -> dict[str, Any]:
    return json.loads(resources.files("nodefoundry_server.api").joinpath("openapi.json").read_text(encoding="utf-8"))


@pytest.fixture
def spec() -> dict[str, Any]:
    return _raw_document()


@pytest.fixture
def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    db_path = tmp_path / "data" / "nodes.db"
    config = config_module.load(environ={"NF_DB_PATH": str(db_path), "NF_ASSETS_DIR": str(tmp_path / "assets")})
    store = Store(db_path)
    store.open()
    return create_app(config, store)


def _template(rule: Rule) -> str:
    """``/api/v1/nodes/<mac>`` -> ``/api/v1/nodes/{mac}``; ``<path:subpath>`` -> ``{path}``."""
    return _CONVERTER.sub(lambda m: "{" + PARAMETER_NAMES.get(m.group(1), m.group(1)) + "}", rule.rule)


def _app_operations(app) -> set[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """(rule, method) pairs the app serves, without HEAD/OPTIONS and Flask's static route."""
    return {
        (rule.rule, method)
        for rule in app.url_map.iter_rules()
        if rule.endpoint != "static"
        for method in rule.methods or ()
        if method not in IGNORED_METHODS
    }


def _doc_operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method.upper(), operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def _path_parameters(spec: dict[str, Any], path: str, operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The path parameters of one operation, $ref's resolved, by name."""
    found = {}
    for parameter in [*spec["paths"][path].get("parameters", []), *operation.get("parameters", [])]:
        if "$ref" in parameter:
            parameter = spec["components"]["parameters"][parameter["$ref"].rsplit("/", 1)[1]]
        if parameter["in"] == "path":
            found[parameter["name"]] = parameter
    return found


def _concrete(spec: dict[str, Any], path: str, operation: dict[str, Any]) -> str:
    """The documented path with each parameter replaced by its example (or first enum value)."""
    parameters = _path_parameters(spec, path, operation)

    def value(match: re.Match[str]) -> str:
        parameter = parameters[match.group(1)]
        if "example" in parameter:
            return str(parameter["example"])
        return str(parameter["schema"]["enum"][0])

    return re.sub(r"\{([^}]+)\}", value, path)


def test_document_is_valid_openapi_3_0(spec: dict[str, Any]) -> None:
    assert spec["openapi"] == "3.0.3"
    validate(spec)


def test_served_document_is_the_file(spec: dict[str, Any]) -> None:
    assert document() == spec


def test_every_path_parameter_is_declared(spec: dict[str, Any]) -> None:
    for path, _method, operation in _doc_operations(spec):
        named = set(re.findall(r"\{([^}]+)\}", path))
        declared = _path_parameters(spec, path, operation)
        assert named == set(declared), f"{path}: template {named} vs parameters {set(declared)}"
        assert all(p.get("required") for p in declared.values()), path


def test_documented_operations_exist_in_the_app(app, spec: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    adapter = app.url_map.bind("localhost")
    for path, method, operation in _doc_operations(spec):
        url = _concrete(spec, path, operation)
        try:
            rule, _args = adapter.match(url, method=method, return_rule=True)
        except (NotFound, MethodNotAllowed) as exc:
            pytest.fail(f"documented {method} {path} ({url}) is not served: {exc.__class__.__name__}")
        assert rule.endpoint != "static", f"{method} {path} only matches Flask's static route"
        if "{" in path:
            assert _template(rule) == path, f"{method} {path} is served as {rule.rule}: parameter names differ"


def test_every_app_operation_is_documented(app, spec: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    adapter = app.url_map.bind("localhost")
    covered: set[tuple[str, str]] = set()
    for path, method, operation in _doc_operations(spec):
        rule, _args = adapter.match(_concrete(spec, path, operation), method=method, return_rule=True)
        covered.add((rule.rule, method))
    missing = sorted(f"{method} {rule}" for rule, method in _app_operations(app) - covered)
    assert not missing, f"routes missing from openapi.json: {missing}"


def test_api_operations_need_a_token_except_the_document(spec: dict[str, Any]) -> None:
    scheme = spec["components"]["securitySchemes"]["bearerAuth"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, method, operation in _doc_operations(spec):
        security = operation.get("security", spec.get("security", []))
        protected = path.startswith("/api/v1/") and path != "/api/v1/openapi.json"
        assert (security == [{"bearerAuth": []}]) == protected, f"{method} {path}: security {security}"
        if protected:
            assert "401" in operation["responses"], f"{method} {path} lacks 401"
            assert ("403" in operation["responses"]) == (method != "GET"), f"{method} {path}: 403 only for writes"


def test_every_ref_resolves(spec: dict[str, Any]) -> None:
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if ref is not None:
                target: Any = spec
                for part in ref.removeprefix("#/").split("/"):
                    target = target[part]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)


def test_required_schemas_are_present(spec: dict[str, Any]) -> None:
    wanted = {"Node", "NodeCreate", "NodePatch", "Action", "BulkRequest", "BulkResult", "Event", "Error", "Health"}
    assert wanted <= set(spec["components"]["schemas"])
    node = spec["components"]["schemas"]["Node"]
    assert node["properties"]["status"]["enum"] == ["discovered", "installing", "installed", "failed"]
    assert node["properties"]["liveness"]["enum"] == ["online", "offline", "unknown"]
