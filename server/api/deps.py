"""Dependencies of the routes: settings, the service, the API-key checks, and the JSON form fields parsed.

The dependencies are `async def` (they never block): a plain `def` would cost a thread-pool hop each per request.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError

from server.api.schemas import INT64, MAX_JSON_DEPTH, Filter, Scalar, validation_message
from server.contract import ServiceError, TooLarge, Unprocessable
from server.security import check_key
from server.service import Service
from server.settings import Settings

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key.")
bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token (alternative to X-API-Key).")


class NotReady(ServiceError):
    """The release or the store is not open (starting or stopping)."""

    status = 503


async def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


async def get_service(request: Request) -> Service:
    """The open service, or 503 while the server starts or stops."""
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the server is starting or stopping; retry in a moment")
    return service


def _key(header: str | None, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return header or (credentials.credentials if credentials else None)


async def require_write_key(settings: Annotated[Settings, Depends(get_settings)],
                            header: Annotated[str | None, Depends(api_key_header)],
                            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Writes need the API key whenever one is configured."""
    check_key(settings.api_key, _key(header, credentials))


async def require_read_key(settings: Annotated[Settings, Depends(get_settings)],
                           header: Annotated[str | None, Depends(api_key_header)],
                           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Reads need the API key only with CONCORD_AUTH_READS=true."""
    if settings.auth_reads:
        check_key(settings.api_key, _key(header, credentials))


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
write = [Depends(require_write_key)]
read = [Depends(require_read_key)]
FILTER: TypeAdapter[dict[str, Scalar]] = TypeAdapter(Filter)


def _refuse_constant(name: str) -> Any:
    raise Unprocessable(f"{name} is not a JSON number: NaN and Infinity are refused")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Unprocessable(f"the number {text[:40]} is beyond the range of a float (64-bit)")
    return value


def _int64(text: str) -> int:
    value = int(text)
    if not -INT64 <= value < INT64:
        raise Unprocessable(f"the integer {text[:40]} is beyond the range of a 64-bit integer (+-2^63)")
    return value


def _depth(value: Any) -> int:
    """How deeply a parsed JSON value nests objects and arrays (a scalar is 0)."""
    depth, level = 0, [(value, 1)]
    while level:
        item, d = level.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            depth = max(depth, d)
            level.extend((child, d + 1) for child in children)
    return depth


def json_form(text: str | None, field: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A form field holding strict JSON (no NaN/Infinity, numbers a float or an int64 holds, nested at most
    `max_depth` deep), None when absent or blank; 422 otherwise."""
    if text is None or text.strip() == "":
        return None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_int64)
    except Unprocessable as err:
        raise Unprocessable(f"the form field {field!r}: {err.message}") from None
    except json.JSONDecodeError as err:
        raise Unprocessable(f"the form field {field!r} is not valid JSON ({err})") from None
    except (RecursionError, ValueError):
        raise Unprocessable(f"the form field {field!r} is not JSON this server reads (nested too deeply, or a "
                            f"number too long)") from None
    if _depth(value) > max_depth:
        raise Unprocessable(f"the form field {field!r} nests objects and arrays more than {max_depth} deep")
    return value


def parse_metadata(text: str | None, count: int, max_bytes: int) -> list[dict[str, Any]]:
    """The `metadata` form field: one JSON object for every photo, or a list with one object per photo; each
    photo's metadata at most `max_bytes` of JSON (413), nested at most MAX_JSON_DEPTH deep."""
    value = json_form(text, "metadata", MAX_JSON_DEPTH + 1)
    if value is None:
        return [{} for _ in range(count)]
    if isinstance(value, dict):
        if _depth(value) > MAX_JSON_DEPTH:
            raise Unprocessable(f"'metadata' nests objects and arrays more than {MAX_JSON_DEPTH} deep")
        metas = [value] * count
    elif isinstance(value, list) and all(isinstance(v, dict) for v in value):
        if len(value) != count:
            raise Unprocessable(f"'metadata' lists {len(value)} objects for {count} files; give one per file "
                                f"or a single object for all")
        metas = value
    else:
        raise Unprocessable("'metadata' must be a JSON object, or a list of objects (one per file)")
    for i, meta in enumerate(metas):
        size = len(json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        if size > max_bytes:
            raise TooLarge(f"the metadata of file #{i} is {size:,} bytes of JSON, above this server's limit of "
                           f"{max_bytes:,} per photo (CONCORD_MAX_METADATA_BYTES); a single object given for all "
                           f"files is stored with each of them")
    return [dict(m) for m in metas]


def parse_filter(text: str | None) -> dict[str, Scalar] | None:
    """The `filter` field: a JSON object of metadata keys and the plain values they must equal."""
    value = json_form(text, "filter")
    if value is None:
        return None
    if not isinstance(value, dict) or any(isinstance(v, dict | list) for v in value.values()):
        raise Unprocessable("'filter' must be a JSON object of metadata keys and the plain values they must equal")
    try:
        checked: dict[str, Scalar] = FILTER.validate_python(value)
    except ValidationError as err:
        raise Unprocessable(f"'filter': {validation_message(err.errors())}") from None
    return checked
