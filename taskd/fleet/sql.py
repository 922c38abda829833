"""The fleet's SQL, one statement per round trip (issue10-design.md §4.3-§4.7). asyncpg
prepares each text once per connection and keeps it (its statement cache), so these are
plain constants. Every parameter is cast: asyncpg infers types from the statement, and a
bare ``$2 - $7`` has none. Every time is the database's ``now()``, never a host's clock."""

from __future__ import annotations

from typing import Final

# Claim a scheduled or catch-up tick (kind 's') or a manual run (kind 'm', tick NULL: the
# database's now() is the tick): the function taskd.claim (schema v2, CLAIM_FUNCTION below).
# Parameters: $1 job, $2 tick, $3 kind, $4 node, $5 cause, $6 window (how late a claim may
# be), $7 early slack, $8 lease, $9 overlap = "skip".
CLAIM: Final = """
SELECT fence, lease_until, tick, db_now, why, holder, paused_at
  FROM taskd.claim($1::text, $2::timestamptz, $3::text, $4::text, $5::text, $6::interval,
                   $7::interval, $8::interval, $9::boolean)
"""

# The claim as one function, so it stays one round trip and yet takes two snapshots: its
# first statement locks the job's row (serialising one job's claims with each other and with
# a pause), and only the second, with a snapshot taken after that lock was granted, checks
# pause and overlap and inserts. In one statement the overlap check would read a snapshot
# from before the lock wait and miss a claim of another tick committed meanwhile (READ
# COMMITTED re-checks only the locked row), and both ticks of a "skip" job would run.
CLAIM_FUNCTION: Final = """
CREATE FUNCTION taskd.claim(p_job text, p_tick timestamptz, p_kind text, p_node text,
    p_cause text, p_window interval, p_early interval, p_lease interval, p_skip boolean)
RETURNS TABLE (fence bigint, lease_until timestamptz, tick timestamptz, db_now timestamptz,
               why text, holder text, paused_at timestamptz)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
BEGIN
  PERFORM 1 FROM taskd.jobs WHERE job = p_job FOR UPDATE;
  RETURN QUERY
  WITH j AS (SELECT jb.paused, jb.paused_at FROM taskd.jobs jb WHERE jb.job = p_job),
   t AS (SELECT COALESCE(p_tick, now()) AS tick),
   w AS (SELECT CASE
       WHEN j.paused THEN 'paused'
       WHEN now() < t.tick - p_early THEN 'early'
       WHEN now() > t.tick + p_window THEN 'late'
       WHEN p_skip AND EXISTS (
         SELECT 1 FROM taskd.claims c WHERE c.job = p_job AND c.state = 'running'
            AND (c.tick, c.kind) <> (t.tick, p_kind)) THEN 'overlap'
     END AS why FROM j, t),
   ins AS (INSERT INTO taskd.claims AS c (job, tick, kind, fence, owner, cause, lease_until)
     SELECT p_job, t.tick, p_kind, nextval('taskd.fence_seq'), p_node, p_cause,
            now() + p_lease
       FROM w, t WHERE w.why IS NULL
     ON CONFLICT DO NOTHING RETURNING c.fence, c.lease_until)
  SELECT ins.fence, ins.lease_until, (SELECT t.tick FROM t), now(),
    COALESCE((SELECT w.why FROM w),
             CASE WHEN (SELECT count(*) FROM j) = 0 THEN 'unknown'
                  WHEN ins.fence IS NULL THEN 'taken' END),
    (SELECT c.owner FROM taskd.claims c, t WHERE ins.fence IS NULL AND c.job = p_job
        AND c.tick = t.tick AND c.kind = p_kind),
    (SELECT j.paused_at FROM j)
  FROM (SELECT 1) one LEFT JOIN ins ON true;
END
$fn$
"""

# Extend every live claim this node holds, in one statement per node per interval, and mark
# the node alive. A fence sent that does not come back was taken over (or ended). $1 node,
# $2 fences, $3 lease, $4 pid, $5 boot id, $6 version.
HEARTBEAT: Final = """
WITH n AS (
  INSERT INTO taskd.nodes AS n (node, pid, boot_id, addr, version, started_at, heartbeat)
  VALUES ($1::text, $4::int, $5::text, inet_client_addr()::text, $6::text, now(), now())
  ON CONFLICT (node) DO UPDATE SET heartbeat = now(), pid = EXCLUDED.pid,
     boot_id = EXCLUDED.boot_id, addr = EXCLUDED.addr, version = EXCLUDED.version,
     started_at = CASE WHEN n.pid = EXCLUDED.pid AND n.boot_id = EXCLUDED.boot_id
                       THEN n.started_at ELSE now() END),
 b AS (UPDATE taskd.claims SET lease_until = now() + $3::interval
   WHERE owner = $1::text AND state = 'running' AND fence = ANY($2::bigint[])
   RETURNING fence, lease_until)
SELECT now() AS db_now, ARRAY(SELECT fence FROM b) AS kept,
       (SELECT min(lease_until) FROM b) AS lease_until
"""

# Who holds this node name (the start check): a live row with another pid or boot id is
# another taskd. $1 node, $2 lease.
NODE: Final = """
SELECT pid, boot_id, addr, heartbeat > now() - $2::interval AS live, now() AS db_now
  FROM taskd.nodes WHERE node = $1::text
"""

# Take over or abandon expired claims of the jobs this node knows. SKIP LOCKED keeps nodes
# off each other's rows, and a row a heartbeat holds is skipped; READ COMMITTED re-checks
# `lease_until < now()` on a row whose lock it waited for, so a live owner is never swept.
# $1 node, $2 jobs, $3 retry?, $4 lease, $5 claim window, $6 batch, $7 max takeovers,
# $8 the fences this node still runs (never taken over by itself: one run per tick here).
# A job paused fleet-wide is never taken over (whatever this node's flag says): its expired
# claims end 'cancelled'. The pause's FOR UPDATE on the job row is not waited for: a sweep
# that reads the flag just before a pause commits takes over as a claim would have.
SWEEP: Final = """
WITH expired AS (
  SELECT c.job, c.tick, c.kind, c.takeovers, j.paused FROM taskd.claims c
    JOIN taskd.jobs j USING (job)
   WHERE c.state = 'running' AND c.lease_until < now() AND c.job = ANY($2::text[])
     AND NOT c.fence = ANY($8::bigint[])
   ORDER BY c.lease_until LIMIT $6::int FOR UPDATE OF c SKIP LOCKED)
UPDATE taskd.claims c SET lost_owners = c.lost_owners || c.owner,
   takeovers = c.takeovers + 1,
   owner = CASE WHEN r.retry THEN $1::text ELSE c.owner END,
   fence = CASE WHEN r.retry THEN nextval('taskd.fence_seq') ELSE c.fence END,
   lease_until = CASE WHEN r.retry THEN now() + $4::interval ELSE c.lease_until END,
   state = CASE WHEN r.retry THEN 'running' WHEN e.paused THEN 'cancelled'
                ELSE 'abandoned' END,
   ended_at = CASE WHEN r.retry THEN NULL ELSE now() END,
   error = CASE WHEN r.retry THEN NULL
                WHEN e.paused THEN 'owner ' || c.owner || ' lost its lease; the job is paused'
                ELSE 'owner ' || c.owner || ' lost its lease' END
  FROM expired e,
       LATERAL (SELECT $3::boolean AND e.takeovers < $7::int AND NOT e.paused
                       AND now() <= e.tick + $5::interval AS retry) r
 WHERE (c.job, c.tick, c.kind) = (e.job, e.tick, e.kind)
RETURNING c.job, c.tick, c.kind, c.fence, c.state, c.cause, c.lost_owners, c.lease_until
"""

# Give a claim back unended, for another node to take over at its next sweep: this node
# cannot run it (stopping, the job broken or removed here, no thread). The lease ends now,
# and the takeover this node counted ($3: 1, or 0 for its own claim) is undone, so a node
# that refuses never uses up the tick's max_takeovers. $1 fence, $2 node, $3 undo.
HAND_BACK: Final = """
UPDATE taskd.claims SET lease_until = now(), takeovers = greatest(takeovers - $3::int, 0)
 WHERE fence = $1::bigint AND owner = $2::text AND state = 'running'
RETURNING fence
"""

# Retention: ended rows older than history_max_age, a bounded batch per sweep, but never
# the row of a tick that may still be claimed: that row is the tick's exactly-once guard
# (deleted, a catch-up would claim and run the tick again). $3: how old a tick may still be
# claimed (the largest claim window or grace, and a lease). A manual run's tick is the
# database's now() at its claim, never claimed again.
PRUNE: Final = """
DELETE FROM taskd.claims WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM taskd.claims
   WHERE state <> 'running' AND ended_at < now() - $1::interval
     AND (kind = 'm' OR tick < now() - $3::interval) LIMIT $2::int))
"""

# The running claims of these jobs, for status (owner and fence of each).
RUNNING: Final = """
SELECT job, tick, kind, owner, fence, lease_until FROM taskd.claims
 WHERE state = 'running' AND job = ANY($1::text[])
"""

# A fenced write of one key: kept only while the writer's claim is live and its own (fence,
# owner and job), and never over a value a newer fence wrote (Kleppmann's rule). FOR SHARE on
# the claim row: a sweep that wants to take it over waits until this transaction ends, or
# this statement sees the takeover and writes nothing. $1 key, $2 value, $3 fence, $4 node,
# $5 job.
PUT_STATE: Final = """
INSERT INTO taskd.state AS s (key, value, fence, job)
SELECT $1::text, $2::jsonb, c.fence, c.job FROM taskd.claims c
 WHERE c.fence = $3::bigint AND c.owner = $4::text AND c.job = $5::text
   AND c.state = 'running' AND c.lease_until > now()
 FOR SHARE OF c
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, fence = EXCLUDED.fence,
   job = EXCLUDED.job, updated_at = now()
 WHERE s.fence <= EXCLUDED.fence
RETURNING s.fence
"""

# A fenced delete of one key, under the same rules: ok is false when the claim is not live
# and ours, or a newer fence wrote the key. $1 key, $2 fence, $3 node, $4 job.
DEL_STATE: Final = """
WITH c AS (SELECT c.fence FROM taskd.claims c
            WHERE c.fence = $2::bigint AND c.owner = $3::text AND c.job = $4::text
              AND c.state = 'running' AND c.lease_until > now()
            FOR SHARE OF c),
 d AS (DELETE FROM taskd.state s USING c WHERE s.key = $1::text AND s.fence <= c.fence
       RETURNING s.key)
SELECT EXISTS (SELECT 1 FROM c) AND NOT EXISTS (
         SELECT 1 FROM taskd.state s WHERE s.key = $1::text AND s.fence > $2::bigint) AS ok
"""

GET_STATE: Final = "SELECT key, value, fence FROM taskd.state"

# ctx.state.locked() of a fleet run (taskd.fleet.state): one transaction on a connection of
# its own, from the read to the write, under one fleet-wide advisory lock (the whole state
# is read, as a host's SharedState has one lock), so two blocks anywhere never interleave.
STATE_LOCK: Final = "SELECT pg_advisory_xact_lock(hashtext('taskd.state'))"

# At the write: the run's claim, FOR SHARE so a takeover waits until this transaction ends
# (or this sees the takeover). The lease by the statement's clock: the transaction's now()
# is from before the block ran. $1 fence.
STATE_CLAIM: Final = """
SELECT owner, job, state, lease_until > statement_timestamp() AS live
  FROM taskd.claims WHERE fence = $1::bigint FOR SHARE
"""

# The block's changes: no fence comparison between keys. Under the lock and the claim's row
# lock, the order of writes is the order of the blocks; a fence only says whose claim it was.
# $1 keys, $2 values (JSON text), $3 fence, $4 job.
STATE_PUT: Final = """
INSERT INTO taskd.state AS s (key, value, fence, job)
SELECT k, v::jsonb, $3::bigint, $4::text FROM unnest($1::text[], $2::text[]) AS t(k, v)
ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, fence = EXCLUDED.fence,
   job = EXCLUDED.job, updated_at = now()
"""

STATE_DEL: Final = "DELETE FROM taskd.state WHERE key = ANY($1::text[])"

# End a claim, and write the run's result under its key ($8; NULL: no result), in one
# statement: only the claim's current fence and owner may. The UPDATE locks the claim row,
# so a sweep that wants it waits for us, or we wait for the sweep and then match nothing
# (READ COMMITTED re-checks the row); the result is written only if the claim was ended,
# and never over a value a newer fence wrote. ended NULL: the claim was taken over.
# $1 fence, $2 node, $3 state, $4 attempts, $5 duration, $6 error, $7 result, $8 key.
FINISH: Final = """
WITH fin AS (
  UPDATE taskd.claims SET state = $3::text, ended_at = now(), attempts = $4::int,
         duration = $5::float8, error = $6::text, result = $7::jsonb
   WHERE fence = $1::bigint AND owner = $2::text AND state = 'running'
  RETURNING fence, job),
 put AS (
  INSERT INTO taskd.state AS s (key, value, fence, job)
  SELECT $8::text, $7::jsonb, fin.fence, fin.job FROM fin WHERE $8::text IS NOT NULL
  ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, fence = EXCLUDED.fence,
     job = EXCLUDED.job, updated_at = now()
   WHERE s.fence <= EXCLUDED.fence
  RETURNING s.fence)
SELECT (SELECT fence FROM fin) AS ended, (SELECT fence FROM put) AS wrote
"""

# FINISH for many claims in one statement (the writer's queue, drained): each row ended
# only by its own fence and owner, as FINISH does; its result written under its key
# ($7[i]; NULL: no result), fenced, and of two finishes of one key in the batch only the
# newer fence's (one INSERT may not update a row twice; the older one's value would be
# overwritten at once anyway). Per row: ended (NULL: taken over) and wrote (the key now
# holds this fence's value or a newer one of this batch). Values the database refuses fail
# the whole statement; the writer then writes each row alone (FINISH), so one bad row
# never decides another's verdict. $1 fences, $2 node, $3 states, $4 attempts,
# $5 durations, $6 errors, $7 results (JSON text), $8 keys.
FINISH_MANY: Final = """
WITH a AS (
  SELECT * FROM unnest($1::bigint[], $3::text[], $4::int[], $5::float8[], $6::text[],
                       $7::text[], $8::text[]) AS a(fence, st, attempts, duration, error,
                                                    result, key)),
 fin AS (
  UPDATE taskd.claims c SET state = a.st, ended_at = now(), attempts = a.attempts,
         duration = a.duration, error = a.error, result = a.result::jsonb
    FROM a
   WHERE c.fence = a.fence AND c.owner = $2::text AND c.state = 'running'
  RETURNING c.fence, c.job),
 put AS (
  INSERT INTO taskd.state AS s (key, value, fence, job)
  SELECT DISTINCT ON (a.key) a.key, a.result::jsonb, fin.fence, fin.job
    FROM fin JOIN a USING (fence) WHERE a.key IS NOT NULL
   ORDER BY a.key, fin.fence DESC
  ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, fence = EXCLUDED.fence,
     job = EXCLUDED.job, updated_at = now()
   WHERE s.fence <= EXCLUDED.fence
  RETURNING s.key, s.fence)
SELECT a.fence, fin.fence AS ended,
       (SELECT max(put.fence) FROM put WHERE put.key = a.key AND put.fence >= a.fence) AS wrote
  FROM a LEFT JOIN fin USING (fence)
"""

# Fleet-wide pause/resume, and the notice every node's LISTEN connection gets. One
# statement, so the notice goes out exactly when the flag commits. paused_at (set by a
# resume too) is the flag's version: strictly increasing per job, taken once the row is
# locked, so the flag's answers (claims, notices, re-reads) that reach a node out of order
# are told apart (the older is ignored). The notice carries it in µs (``at``).
# $1 job, $2 paused, $3 by.
PAUSE: Final = """
WITH u AS (
  INSERT INTO taskd.jobs AS j (job, paused, paused_by, paused_at)
  VALUES ($1::text, $2::boolean, $3::text, clock_timestamp())
  ON CONFLICT (job) DO UPDATE SET paused = EXCLUDED.paused,
     paused_by = EXCLUDED.paused_by,
     paused_at = greatest(clock_timestamp(), j.paused_at + interval '1 microsecond')
  RETURNING job, paused_at)
SELECT pg_notify('taskd_fleet',
                 json_build_object('job', $1::text, 'paused', $2::boolean, 'by', $3::text,
                                   'at', (SELECT paused_at FROM u))::text)
  FROM u
"""

CHANNEL: Final = "taskd_fleet"

# Register this node's fleet jobs (at start and reload) and report the ones whose config
# hash differs from the one the last node to start wrote. $1 jobs, $2 hashes, $3 node.
JOBS: Final = """
WITH n AS (SELECT * FROM unnest($1::text[], $2::text[]) AS n(job, spec_hash)),
 old AS (SELECT j.job, j.spec_hash, j.spec_node, j.paused, j.paused_at FROM taskd.jobs j
          JOIN n USING (job)),
 up AS (INSERT INTO taskd.jobs (job, spec_hash, spec_node)
        SELECT job, spec_hash, $3::text FROM n
        ON CONFLICT (job) DO UPDATE SET spec_hash = EXCLUDED.spec_hash,
           spec_node = EXCLUDED.spec_node)
SELECT n.job, COALESCE(old.paused, false) AS paused, old.paused_at, old.spec_node AS other,
       old.spec_hash IS NOT NULL AND old.spec_hash <> n.spec_hash AS differs
  FROM n LEFT JOIN old USING (job)
"""

PAUSED: Final = "SELECT job, paused, paused_at FROM taskd.jobs WHERE job = ANY($1::text[])"
