"""A bounded property-based fuzz of the OpenAPI (schemathesis strategies driven by hypothesis) against a real
server process: no 5xx, every answer (status, content type, body) is one the schema documents, and no answer shows
the server's own paths."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server_helpers import WRITE, ServerProcess, make_photo

MAX_EXAMPLES = 30
"""Examples per operation and generation mode (valid and invalid inputs): 13 operations x 2 modes x 30 bounds the
run to 780 requests."""
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


def test_no_request_gets_a_server_error_or_an_undocumented_answer(tiny_release: Path, tmp_path: Path) -> None:
    statuses: Counter[int] = Counter()
    skipped: list[str] = []
    private = [str(tiny_release.resolve()).encode(), str(tmp_path.resolve()).encode()]
    with ServerProcess(tiny_release, tmp_path / "data") as server:
        files = [("files", (f"p{i}.jpg", make_photo(i), "image/jpeg")) for i in range(3)]
        assert httpx.post(f"{server.url}/v1/photos", files=files, headers=WRITE, timeout=60).status_code == 200
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 13
        for operation in operations:
            for mode in MODES:
                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                          suppress_health_check=list(HealthCheck))
                def fuzz(case: Any) -> None:
                    response = case.call_and_validate(base_url=server.url, headers=WRITE, checks=CHECKS, timeout=60)
                    for folder in private:  # no answer shows where the server keeps its release or its store
                        assert folder not in response.content, (case.path, response.text[:300])
                    statuses[response.status_code] += 1

                try:
                    fuzz()
                except Unsatisfiable:  # no invalid input exists (an operation without parameters or body)
                    assert mode == GenerationMode.NEGATIVE, operation.label
                    skipped.append(operation.label)
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    print(f"fuzz: {sum(statuses.values())} requests over {len(operations)} operations, by status "
          f"{dict(sorted(statuses.items()))}; no invalid input for {skipped}")
    assert statuses and max(statuses) < 500
