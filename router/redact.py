"""Credentials never leave the process: URIs in messages, responses and log lines lose their
passwords (``postgresql://user:secret@db`` becomes ``postgresql://user:***@db``).

The registry's and drivers' own error texts embed the URI they were given, so redaction is applied
to whole messages, not only to the URIs the router formats itself; :class:`RedactingFilter` does
the same for every log record as a last line of defence.
"""

from __future__ import annotations

import logging
import re

MASK = "***"

# scheme://user:password@  (the password ends at the last "@" before the host part)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/\s:@]*):[^\s/]*@")


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URI masked."""
    if "://" not in text:  # the pattern needs it: most log lines (access lines) skip the regex
        return text
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)


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
