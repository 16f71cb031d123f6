"""Credentials never leave the process: URIs in messages, responses and log lines lose their
passwords (``postgresql://user:secret@db`` becomes ``postgresql://user:***@db``) and the values of
password-like query parameters (``?password=secret`` becomes ``?password=***``).

The registry's and drivers' own error texts embed the URI they were given, so redaction is applied
to whole messages, not only to the URIs the router formats itself; :class:`RedactingFilter` does
the same for every log record as a last line of defence.

Each URI is found (``scheme://`` up to the next space, quote or angle bracket) and then parsed, not
matched by a pattern: a password may hold ``/``, ``:`` or ``@`` (the user information ends at the
last ``@`` before the query, as URL parsers read it), and a query parameter may carry the password
(libpq, SQLAlchemy and many HTTP APIs accept ``?password=``, ``?token=``, ``?sig=``). When in doubt
more is masked, never less.
"""

from __future__ import annotations

import logging
from urllib.parse import unquote_plus

MASK = "***"

_SCHEME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-")
_URI_ENDS = frozenset(" \t\r\n\"'`<>")
# Query or fragment parameters whose value is a secret: their names, lower-cased without "-"/"_",
# either exactly one of these or containing one of the longer words.
_SECRET_NAMES = frozenset({"pass", "pw", "pwd", "sig", "key", "auth"})
_SECRET_WORDS = ("password", "passwd", "secret", "token", "apikey", "signature", "credential")


def redact(text: str) -> str:
    """``text`` with the password and password-like parameters of every URI in it masked."""
    if "://" not in text:  # most log lines (access lines) end here
        return text
    out: list[str] = []
    done = 0  # text[:done] is in out
    search = 0
    while (mark := text.find("://", search)) >= 0:
        start = mark
        while start > done and text[start - 1] in _SCHEME_CHARS:
            start -= 1
        while start < mark and not text[start].isalpha():  # a scheme starts with a letter
            start += 1
        end = mark + 3
        while end < len(text) and text[end] not in _URI_ENDS:
            end += 1
        if start == mark:  # no scheme: not a URI
            search = mark + 3
            continue
        out.append(text[done:start])
        out.append(redact_uri(text[start:end]))
        done = search = end
    out.append(text[done:])
    return "".join(out)


def redact_uri(uri: str) -> str:
    """One ``scheme://...`` URI with its password and password-like parameters masked."""
    scheme, _, rest = uri.partition("://")
    at = _userinfo_end(rest)
    if at is not None:
        user, colon, _password = rest[:at].partition(":")
        if colon:
            rest = f"{user}:{MASK}{rest[at:]}"
            at = len(user) + 1 + len(MASK)
    tail_start = 0 if at is None else at
    query = _first_of(rest, "?#", tail_start)
    if query < len(rest):
        rest = rest[:query] + _mask_parameters(rest[query:])
    return f"{scheme}://{rest}"


def _userinfo_end(rest: str) -> int | None:
    """Where the user information ends (its ``@``), or None when there is none."""
    stop = _first_of(rest, "?#", 0)
    at = rest.rfind("@", 0, stop)
    if at >= 0:
        return at
    # A password holding "?" or "#" unencoded: the "@" comes later. "host:port/...?x=a@b" is not.
    at = rest.rfind("@")
    if at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    if colon and "/" not in user and not password.split("/", 1)[0].isdigit():
        return at
    return None


def _first_of(text: str, characters: str, start: int) -> int:
    found = [i for i in (text.find(c, start) for c in characters) if i >= 0]
    return min(found, default=len(text))


def _mask_parameters(part: str) -> str:
    """A query (``?...``) and/or fragment (``#...``) with every secret parameter's value masked."""
    out: list[str] = []
    field: list[str] = []
    for char in part:
        if char in "?#&;":
            out.append(_mask_field("".join(field)))
            out.append(char)
            field = []
        else:
            field.append(char)
    out.append(_mask_field("".join(field)))
    return "".join(out)


def _mask_field(field: str) -> str:
    name, equals, _value = field.partition("=")
    if equals and _is_secret_name(name):
        return f"{name}={MASK}"
    return field


def _is_secret_name(name: str) -> bool:
    """Whether a parameter called ``name`` carries a secret (``password``, ``pwd``, ``token``)."""
    key = unquote_plus(name).lower().replace("-", "").replace("_", "")
    return key in _SECRET_NAMES or any(word in key for word in _SECRET_WORDS)


class RedactingFilter(logging.Filter):
    """Masks URI passwords in a record's formatted message (and its traceback text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
