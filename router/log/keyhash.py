"""The secret behind routing-key hashes in the prediction log, and the hasher that uses it.

Hashes are HMAC-SHA256 (``logschema.hash_routing_key``) under a secret that is *not* the public
assignment salt (``/experiment`` shows the salt; a salted plain hash of user ids was reversed by a
dictionary in 0.2 s). The secret is ``ROUTER_ROUTING_KEY_SECRET`` when set; otherwise a random one
is created once and kept in the prediction log's own database (table ``router_secrets``), which
every replica shares: the first replica to start writes it, the others read the same value. No
endpoint returns it. Changing it (rotation) changes every hash: the same users count as new units
from then on, so rotate between experiments (SECURITY.md).

Start-up never waits for the database: a stored secret is read in the background, retried with
backoff. Until it is read, rows are logged without a routing-key hash; they are counted
(``unhashed``) and ``/readyz`` says why. With ``ROUTER_ROUTING_KEY_SECRET`` set this never happens.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import sqlalchemy as sa

from router.errors import PredictionLogUnavailable
from router.log.database import brief, create_engine, insert_ignoring, safe_url
from router.logschema import hash_routing_key

log = logging.getLogger(__name__)

SECRET_NAME = "routing_key_hmac"
_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)  # backoff while the log database is unreachable

_metadata = sa.MetaData()
router_secrets = sa.Table(
    "router_secrets",
    _metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)


def stored_secret(log_url: str) -> bytes:
    """The secret kept in the log database, created there if absent (first writer wins).

    Blocking: call it off the event loop. Raises :class:`PredictionLogUnavailable`.
    """
    engine = create_engine(log_url)
    try:
        with engine.begin() as conn:
            _metadata.create_all(conn)
            conn.execute(
                insert_ignoring(engine, router_secrets),
                {"name": SECRET_NAME, "value": secrets.token_hex(32)},
            )
            value = conn.execute(
                sa.select(router_secrets.c.value).where(router_secrets.c.name == SECRET_NAME)
            ).scalar_one()
    except sa.exc.SQLAlchemyError as exc:
        raise PredictionLogUnavailable(
            f"prediction log {safe_url(engine)}: cannot read the routing-key secret: {brief(exc)}"
        ) from exc
    finally:
        engine.dispose()
    return str(value).encode()


class RoutingKeyHasher:
    """``hash(key)`` for the log; owned by the app's lifespan, which runs ``load_forever``."""

    def __init__(self, configured: str | None, log_url: str) -> None:
        self._secret = configured.encode() if configured else None
        self._log_url = log_url
        self.error: str | None = None if configured else "not read from the log database yet"
        self.unhashed = 0  # rows logged without a hash because the secret was not read yet

    @property
    def loaded(self) -> bool:
        return self._secret is not None

    def hash(self, key: str) -> str | None:
        if self._secret is None:
            self.unhashed += 1
            return None
        return hash_routing_key(self._secret, key)

    async def load_forever(self) -> None:
        """Read the stored secret, retrying with backoff until it is read (then return)."""
        attempt = 0
        while self._secret is None:
            try:
                self._secret = await asyncio.to_thread(stored_secret, self._log_url)
            except PredictionLogUnavailable as exc:
                self.error = exc.message
                wait = _RETRY_S[min(attempt, len(_RETRY_S) - 1)]
                log.error("routing-key secret (retrying in %gs): %s", wait, exc.message)
                attempt += 1
                await asyncio.sleep(wait)
        self.error = None
        log.info("routing-key hashes use the secret stored in the prediction log database")

    def state(self) -> dict[str, object]:
        """For ``/readyz``: whether hashes are being written, and why not."""
        return {"loaded": self.loaded, "error": self.error, "unhashed_rows": self.unhashed}
