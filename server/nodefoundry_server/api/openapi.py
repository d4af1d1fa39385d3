"""The OpenAPI 3 document served at /api/v1/openapi.json."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def document() -> dict[str, Any]:
    return json.loads(resources.files(__package__).joinpath("openapi.json").read_text())
