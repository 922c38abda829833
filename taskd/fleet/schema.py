"""The fleet's tables in PostgreSQL, created and migrated by taskd itself.

:data:`MIGRATIONS` is the whole history: entry ``i`` takes the schema from version ``i`` to
``i + 1``. :func:`migrate` runs at start, in one transaction under an advisory lock, so hosts
that start together neither race to create the tables nor see half a migration. A database
newer than this taskd is refused (:class:`SchemaTooNew`): this taskd cannot know what the
newer one relies on, so its fleet jobs do not run (host jobs go on)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from taskd.fleet.sql import CLAIM_FUNCTION

if TYPE_CHECKING:
    import asyncpg

# hashtext('taskd.schema') in the lock call: one key, whatever database the fleet uses.
_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext('taskd.schema'))"

_V1: Final = (
    "CREATE SCHEMA IF NOT EXISTS taskd",
    """CREATE TABLE taskd.meta (
         singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
         schema_version int NOT NULL,
         created_at timestamptz NOT NULL DEFAULT now())""",
    "INSERT INTO taskd.meta (schema_version) VALUES (0)",
    # Fences: strictly increasing, gaps allowed (a refused claim's nextval is not rolled back).
    "CREATE SEQUENCE taskd.fence_seq AS bigint",
    # One row per live taskd (its heartbeat); the start check refuses a second host that uses
    # a name a live one holds, since the two would extend each other's claims.
    """CREATE TABLE taskd.nodes (
         node text PRIMARY KEY, pid int, boot_id text, addr text, version text,
         started_at timestamptz, heartbeat timestamptz)""",
    # One row per fleet job: the fleet-wide pause flag, and the hash of the job's config as
    # the last node to start saw it (a mismatch logs fleet_config_differs: hosts with
    # different schedules compute different ticks, and both run).
    """CREATE TABLE taskd.jobs (
         job text PRIMARY KEY, paused boolean NOT NULL DEFAULT false,
         paused_by text, paused_at timestamptz, spec_hash text, spec_node text)""",
    # The claim, the lease, the fence and the fleet-wide history row in one. The primary key
    # is the exactly-one-claim-per-tick guarantee.
    """CREATE TABLE taskd.claims (
         job text NOT NULL REFERENCES taskd.jobs(job),
         tick timestamptz NOT NULL,
         kind text NOT NULL DEFAULT 's' CHECK (kind IN ('s', 'm')),
         fence bigint NOT NULL UNIQUE,
         owner text NOT NULL,
         state text NOT NULL DEFAULT 'running' CHECK (state IN
           ('running', 'succeeded', 'failed', 'timed_out', 'cancelled', 'abandoned')),
         cause text NOT NULL,
         claimed_at timestamptz NOT NULL DEFAULT now(),
         lease_until timestamptz NOT NULL,
         ended_at timestamptz,
         attempts int NOT NULL DEFAULT 0,
         duration double precision,
         error text,
         result jsonb,
         takeovers int NOT NULL DEFAULT 0,
         lost_owners text[] NOT NULL DEFAULT '{}',
         PRIMARY KEY (job, tick, kind))
       WITH (fillfactor = 80)""",
    # lease_until is in no index: a heartbeat's update of it is then a HOT update (no index
    # entries written, room kept on the page by the fillfactor), 1,000 claims in one
    # statement stay cheap. The sweep finds the running claims by job and filters them.
    "CREATE INDEX claims_running ON taskd.claims (job) WHERE state = 'running'",
    "CREATE INDEX claims_owner ON taskd.claims (owner) WHERE state = 'running'",
    "CREATE INDEX claims_history ON taskd.claims (job, claimed_at DESC)",
    "CREATE INDEX claims_ended ON taskd.claims (ended_at) WHERE state <> 'running'",
    # Fenced shared state: a write is kept only while the writer's claim is live, and never
    # over a value written under a newer fence.
    """CREATE TABLE taskd.state (
         key text PRIMARY KEY, value jsonb, fence bigint NOT NULL, job text NOT NULL,
         updated_at timestamptz NOT NULL DEFAULT now())""",
)

# v2: the claim as a function (taskd.fleet.sql.CLAIM_FUNCTION): one round trip, two
# snapshots, so overlap = "skip" holds when claims of two ticks race (review R1).
_V2: Final = (CLAIM_FUNCTION,)

MIGRATIONS: Final[Sequence[Sequence[str]]] = (_V1, _V2)
VERSION: Final = len(MIGRATIONS)


class SchemaTooNew(RuntimeError):
    """The database's schema is newer than this taskd knows."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"fleet database schema v{found} is newer than this taskd (v{known}): upgrade "
            f"taskd on this host; its fleet jobs do not run until then (host jobs go on)"
        )
        self.found = found
        self.known = known


async def version(conn: asyncpg.Connection) -> int:
    """The schema version in the database (0: no taskd schema yet)."""
    if await conn.fetchval("SELECT to_regclass('taskd.meta')") is None:
        return 0
    return int(await conn.fetchval("SELECT schema_version FROM taskd.meta"))


async def migrate(
    conn: asyncpg.Connection, migrations: Sequence[Sequence[str]] = MIGRATIONS
) -> tuple[int, int]:
    """Bring the schema to ``len(migrations)``: every missing step in one transaction.
    Returns (the version found, the version now). Raises :class:`SchemaTooNew`."""
    known = len(migrations)
    async with conn.transaction():
        await conn.execute(_LOCK)
        found = await version(conn)
        if found > known:
            raise SchemaTooNew(found, known)
        for step in migrations[found:]:
            for stmt in step:
                await conn.execute(stmt)
        if found < known:
            await conn.execute("UPDATE taskd.meta SET schema_version = $1", known)
    return found, known
