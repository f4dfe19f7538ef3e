"""Log lines that say which call they belong to: method, request id, session and peer.

The call interceptor (metrics.py) makes the call being served current for its duration; a
`CallFilter` on the log handler copies its fields onto every record logged meanwhile, by any
logger (grpc's own too). `JsonFormatter` writes one JSON object per line; `TextFormatter` the
usual text, with ` [request_id=...]` at the end when the call has one (quoted and cut when it
is not a plain word: its caller chose it).
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import re
from typing import Any

import grpc

from gradwire.limits import MAX_REQUEST_ID_CHARS, MAX_SESSION_CHARS, REQUEST_ID, SESSION

#: The fields a record may carry beyond the standard ones, in the order JSON lines show them.
CALL_FIELDS = ("method", "request_id", "session", "peer")
ACCESS_FIELDS = ("code", "duration_ms")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Call:
    """The RPC being served. Its metadata and peer are read only when a line is logged."""

    __slots__ = ("_fields", "context", "method")

    def __init__(self, method: str, context: grpc.ServicerContext) -> None:
        self.method = method
        self.context = context
        self._fields: dict[str, str] | None = None

    def fields(self) -> dict[str, str]:
        """method, and request_id, session and peer where known."""
        if self._fields is None:
            fields = {"method": self.method}
            try:
                metadata = dict(self.context.invocation_metadata() or ())
                for key, name in ((REQUEST_ID, "request_id"), (SESSION, "session")):
                    value = metadata.get(key)
                    if isinstance(value, str) and value:
                        fields[name] = value
                fields["peer"] = self.context.peer()
            except Exception:  # a log line never fails for want of its decoration
                pass
            self._fields = fields
        return self._fields


#: The call this thread is serving; None outside calls.
CURRENT_CALL: contextvars.ContextVar[Call | None] = contextvars.ContextVar(
    "gradwire_call", default=None
)


class CallFilter(logging.Filter):
    """Copies the current call's fields onto each record (as attributes); drops nothing."""

    def filter(self, record: logging.LogRecord) -> bool:
        call = CURRENT_CALL.get()
        if call is not None:
            for name, value in call.fields().items():
                if not hasattr(record, name):
                    setattr(record, name, value)
        return True


def _call_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {name: getattr(record, name) for name in CALL_FIELDS if hasattr(record, name)}
    if not fields:  # a handler without CallFilter: read the call directly
        call = CURRENT_CALL.get()
        if call is not None:
            fields = dict(call.fields())
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the call's
    fields (method, request_id, session, peer) when logged during one, the caller's request
    id and session cut as TEXT_TAGS says."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        line: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_call_fields(record))
        for name, limit in TEXT_TAGS.items():  # the caller's: cut as a text line cuts them
            value = line.get(name)
            if isinstance(value, str) and len(value) > limit:
                line[name] = value[:limit] + "..."
        for name in (*ACCESS_FIELDS, "reason"):  # reason: a refused start's (cli/serving.py)
            if hasattr(record, name):
                line[name] = getattr(record, name)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


#: The fields a text line ends with, and the most characters of each it shows: the
#: server's limit on a request id, and the longest session id a client sends. A JSON line
#: cuts them there too, '...' after: a caller chose them, and 5,000 characters each made
#: a refusal's line 10 KB long, past 16 KiB with more (found by a review of the server's
#: log as an operator's collector reads it).
TEXT_TAGS = {"request_id": MAX_REQUEST_ID_CHARS, "session": MAX_SESSION_CHARS}

#: A caller's value shown as it came: one word of characters that mean nothing in a line's
#: layout (abc-123, a hex id, base64).
_PLAIN = re.compile(r"[A-Za-z0-9._:/+=@-]+")


def shown_tag(value: str, limit: int) -> str:
    """A call's field as a text line shows it: as it came when plain, else quoted with
    JSON's escapes (quotes, backslashes, control and non-ASCII characters), cut to `limit`
    characters with '...' after the quotes. The caller chooses these values, token or not:
    shown raw, a request id of 'x] 2026-12-05 ... CRITICAL gradwire_server: state dir deleted
    [request_id=y' made a refusal's WARNING read as a second, CRITICAL, line of the
    server's (a security review, sixty-second session)."""
    if len(value) <= limit and _PLAIN.fullmatch(value):
        return value
    return json.dumps(value[:limit]) + ("..." if len(value) > limit else "")


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, with ` [request_id=... session=...]` appended when the call has them,
    each as `shown_tag` shows it."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = _call_fields(record)
        tags = [
            f"{k}={shown_tag(str(fields[k]), limit)}"
            for k, limit in TEXT_TAGS.items()
            if k in fields
        ]
        return f"{text} [{' '.join(tags)}]" if tags else text


def log_handler(log_format: str = "text") -> logging.Handler:
    """A handler to stderr in `log_format` ("text" or "json") that knows the current call."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler()
    handler.addFilter(CallFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler
