"""``taskd history JOB`` for a fleet job: the fleet's own record of the job's runs (taskd.claims,
one row per tick, whichever host ran it), read straight from the fleet's database through the
config's [fleet] table, with no daemon. Rows have the shape of taskd.state.history's, plus
``owner`` (the host that ran or holds it), ``fence`` and ``takeovers``."""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from taskd.fleet.conn import FleetDown, from_ts, is_gone, password

if TYPE_CHECKING:
    from taskd.config.model import FleetConfig

# Newest first by claim; the table exists from schema v1 on. $1 job, $2 limit, $3 failed
# only, $4 since (NULL: any).
_QUERY: Final = """
SELECT tick, kind, fence, owner, state, cause, claimed_at, ended_at, attempts, duration,
       error, result, takeovers, lost_owners
  FROM taskd.claims
 WHERE job = $1::text
   AND (NOT $3::boolean OR state NOT IN ('succeeded', 'running'))
   AND ($4::timestamptz IS NULL OR claimed_at >= $4::timestamptz)
 ORDER BY claimed_at DESC LIMIT $2::int
"""


async def _read(
    cfg: FleetConfig, job: str, limit: int, failed: bool, since: float | None
) -> list[dict[str, Any]]:
    from taskd.fleet.conn import to_ts

    try:
        conn = await asyncpg.connect(
            cfg.dsn,
            password=await password(cfg),
            timeout=cfg.connect_timeout,
            command_timeout=max(cfg.connect_timeout, 10.0),
            server_settings={"application_name": "taskd-history"},
        )
    except Exception as exc:
        if is_gone(exc) or isinstance(exc, asyncpg.PostgresError):
            raise FleetDown(f"fleet database unreachable: {type(exc).__name__}: {exc}") from None
        raise
    try:
        if await conn.fetchval("SELECT to_regclass('taskd.claims')") is None:
            return []  # no host has started with this database yet
        rows = await conn.fetch(_QUERY, job, limit, failed, None if since is None else to_ts(since))
    finally:
        await conn.close()
    return [_row(job, r) for r in rows]


def _row(job: str, r: Any) -> dict[str, Any]:
    tick, started = from_ts(r["tick"]), from_ts(r["claimed_at"])
    result = None if r["result"] is None else json.loads(r["result"])  # jsonb: valid JSON
    return {
        "run_id": f"fence {r['fence']}",
        "job": job,
        "cause": r["cause"] if r["kind"] == "s" else "manual",
        "outcome": r["state"],
        "attempts": r["attempts"],
        "scheduled": tick,
        "started": started,
        "late": max(0.0, started - tick),
        "duration": r["duration"],
        "error": r["error"],
        "result": result,
        "owner": r["owner"],
        "fence": r["fence"],
        "takeovers": r["takeovers"],
        "lost_owners": list(r["lost_owners"]),
    }


def read_fleet_history(
    cfg: FleetConfig, job: str, *, limit: int, failed: bool = False, since: float | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` runs of fleet job ``job``, newest first. Raises FleetDown when
    the database cannot be reached (the message says why, never the password)."""
    return asyncio.run(_read(cfg, job, limit, failed, since))
