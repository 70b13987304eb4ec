"""Field types shared by the settings classes read from `CFS_*` variables."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BeforeValidator
from pydantic_settings import NoDecode


def _url_list(value: Any) -> Any:
    """`CFS_NATS_URLS` as the `--cluster` flag takes it (comma-separated), or a JSON list;
    a value from a config file or the code (already a list) is left as it is."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("not a JSON list of URLs nor comma-separated URLs") from None
    return [url.strip() for url in value.split(",") if url.strip()]


# Not JSON-decoded by pydantic-settings first: a plain `nats://host:4222` must work.
UrlList = Annotated[list[str], NoDecode, BeforeValidator(_url_list)]
