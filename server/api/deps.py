"""Dependencies of the routes: settings, the service, the API-key checks, and the JSON form fields parsed."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from server.api.schemas import Scalar
from server.security import check_key
from server.service import Service, ServiceError, Unprocessable
from server.settings import Settings

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key.")
bearer = HTTPBearer(auto_error=False, description="The API key as a bearer token (alternative to X-API-Key).")


class NotReady(ServiceError):
    """The release or the store is not open (starting or stopping)."""

    status = 503


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_service(request: Request) -> Service:
    """The open service, or 503 while the server starts or stops."""
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None:
        raise NotReady("the server is starting or stopping; retry in a moment")
    return service


def _key(header: str | None, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return header or (credentials.credentials if credentials else None)


def require_write_key(settings: Annotated[Settings, Depends(get_settings)],
                      header: Annotated[str | None, Depends(api_key_header)],
                      credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Writes need the API key whenever one is configured."""
    check_key(settings.api_key, _key(header, credentials))


def require_read_key(settings: Annotated[Settings, Depends(get_settings)],
                     header: Annotated[str | None, Depends(api_key_header)],
                     credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """Reads need the API key only with CONCORD_AUTH_READS=true."""
    if settings.auth_reads:
        check_key(settings.api_key, _key(header, credentials))


ServiceDep = Annotated[Service, Depends(get_service)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
write = [Depends(require_write_key)]
read = [Depends(require_read_key)]


def json_form(text: str | None, field: str) -> Any:
    """A form field holding JSON, None when absent or blank; 422 when it is not JSON."""
    if text is None or text.strip() == "":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise Unprocessable(f"the form field {field!r} is not valid JSON ({err})") from None


def parse_metadata(text: str | None, count: int) -> list[dict[str, Any]]:
    """The `metadata` form field: one JSON object for every photo, or a list with one object per photo."""
    value = json_form(text, "metadata")
    if value is None:
        return [{} for _ in range(count)]
    if isinstance(value, dict):
        return [dict(value) for _ in range(count)]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        if len(value) != count:
            raise Unprocessable(f"'metadata' lists {len(value)} objects for {count} files; give one per file "
                                f"or a single object for all")
        return value
    raise Unprocessable("'metadata' must be a JSON object, or a list of objects (one per file)")


def parse_filter(text: str | None) -> dict[str, Scalar] | None:
    """The `filter` field: a JSON object of metadata keys and the plain values they must equal."""
    value = json_form(text, "filter")
    if value is not None and (not isinstance(value, dict)
                              or any(isinstance(v, dict | list) for v in value.values())):
        raise Unprocessable("'filter' must be a JSON object of metadata keys and the plain values they must equal")
    return value
