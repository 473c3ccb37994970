"""Credentials out of everything Whence writes: run.json, manifest.json, the report, log lines.

A corpus location may carry credentials, in its user-info part (`s3://KEY:SECRET@bucket/path`) or in its query
(`s3://bucket/path?access_key=KEY&secret_key=SECRET`, as pyarrow's filesystems accept). What is written keeps the
scheme, host, path and the other query parameters, so a run still says where its corpus was:

    redact_uri("s3://KEY:SECRET@bucket/a.jsonl")                 -> "s3://REDACTED@bucket/a.jsonl"
    redact_uri("s3://bucket/a.jsonl?secret_key=S&region=eu-1")   -> "s3://bucket/a.jsonl?secret_key=REDACTED&region=eu-1"

Local paths (no scheme) are returned unchanged.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"

# Query parameters that carry a secret (pyarrow S3/GCS options, presigned URLs, SAS tokens), matched by name.
SECRET_PARAMETER = re.compile(r"(key|secret|token|password|passwd|credential|signature|^sig$|auth)", re.IGNORECASE)

# A URI inside free text: a scheme, "://", then anything up to whitespace or a quote.
URI_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_uri(location: str) -> str:
    """`location` with the user-info part and the secret-carrying query parameters replaced by REDACTED."""
    if "://" not in location:
        return location
    try:
        parts = urlsplit(location)
    except ValueError:  # not parseable as a URI (an odd local name): nothing recognisable to keep
        return location
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(SECRET_PARAMETER.search(name) for name, _ in pairs):
            query = urlencode([(name, REDACTED if SECRET_PARAMETER.search(name) else value) for name, value in pairs],
                              safe="/:")
    if netloc == parts.netloc and query == parts.query:
        return location
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URI inside `text` (an error message, a formatted value) passed through redact_uri."""
    if "://" not in text:
        return text
    return URI_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), text)


def redact_value(value):
    """A JSON-like value (dict, list, str, ...) with every string passed through redact_text."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_value(item) for item in value)
    return value
