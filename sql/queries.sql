-- The service's statements, one named block each, loaded once by mltasks/sql.py.
-- A block starts with `-- name --`; the comment lines after it say what it is for.
-- Parameters are always bound (%(name)s), never formatted in.

-- claim_batch --
-- Claim up to %(limit)s pending rows, most urgent first. SKIP LOCKED lets several
-- bridges share the table without double claims.
-- Every claim stamps its rows with %(token)s, a random token the answer must bring back
-- (answer_batch): only rows this service claimed can be answered.
-- Two kinds of row are answered 255 here, in the same statement, and come back without
-- their state (`overdue` or `invalid` says which; the bridge only counts them):
-- * a row already past the deadline (%(deadline_s)s after its created_at) is closed
--   `expired`, reason `deadline`: the game has given up on it. Answering it here rather
--   than in a second statement (expire_batch) saves that statement and a second update
--   of the row, which is when the bridge has least time for them: behind, after a stall;
-- * a row whose state is not a one-dimensional array of 64 values is closed `invalid`
--   (reason state_length_<its first dimension>): its array never leaves PostgreSQL (a
--   1 MB state would otherwise travel with, and delay, every row of its batch).
-- The deadline is measured from statement_timestamp(), one value for the whole statement:
-- a row's status and its answered_at can never disagree at the deadline's edge, and no
-- CTE holding a clock needs joining to the update.
-- A state leaves as array_send's bytes (the real[]'s binary form): the bridge passes them on
-- untouched and a worker decodes a batch of them as one array (mltasks/serving/
-- validation.py); no side makes 64 Python floats of a row.
-- `woke` takes this bridge off the sleepers' record (bridge_sleeps) in the same round trip:
-- a bridge woken by a NOTIFY claims next, so the game's INSERTs stop notifying from here
-- (a separate bridge_wakes cost 0.18 ms, p50, on the path of every decision at 1 client).
WITH woke AS (
    DELETE FROM ai_bridges_waiting WHERE pid = pg_backend_pid()
), picked AS (
    SELECT request_id
    FROM ai_requests
    WHERE status = 'pending'
    ORDER BY priority DESC, created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), claimed AS (
    -- The state's check is written out in SET and in RETURNING (the state itself is not
    -- updated: both see the same value) rather than in a CTE of its own, which cost every
    -- claimed row one more primary-key lookup.
    UPDATE ai_requests AS r
    SET status = CASE WHEN NOT (r.state_vector IS NULL OR (array_ndims(r.state_vector) = 1
                                AND cardinality(r.state_vector) = 64))
                      THEN 'invalid'
                      WHEN r.created_at < statement_timestamp()
                                          - make_interval(secs => %(deadline_s)s)
                      THEN 'expired'
                      ELSE 'processing' END,
        claimed_at = clock_timestamp(), attempts = r.attempts + 1,
        claim_token = %(token)s,
        answered_at = CASE WHEN (r.state_vector IS NULL OR (array_ndims(r.state_vector) = 1
                                 AND cardinality(r.state_vector) = 64))
                                AND r.created_at >= statement_timestamp()
                                                    - make_interval(secs => %(deadline_s)s)
                           THEN NULL ELSE clock_timestamp() END
    WHERE r.request_id = ANY (ARRAY(SELECT request_id FROM picked))
    RETURNING r.request_id, r.archetype, r.mob_id,
              CASE WHEN r.status = 'processing' THEN array_send(r.state_vector) END
                  AS state_vector,
              r.monster_id, r.priority, r.created_at,
              r.status = 'expired' AS overdue,
              CASE WHEN r.status = 'invalid'
                   THEN 'state_length_' || coalesce(array_length(r.state_vector, 1), 0)
              END AS invalid
), refused AS (
    INSERT INTO ai_responses (request_id, action_id, confidence, source, reason)
    SELECT request_id, 255, 0, 'bridge', coalesce(invalid, 'deadline')
    FROM claimed WHERE invalid IS NOT NULL OR overdue
    ON CONFLICT (request_id) DO NOTHING
)
SELECT request_id, archetype, mob_id, state_vector, monster_id, overdue,
       extract(epoch FROM created_at)::float8 AS created_epoch,
       invalid
FROM claimed
ORDER BY priority DESC, created_at;

-- release_stale --
-- Give back rows whose lease ran out (a worker died or a batch was lost), so that a
-- bridge claims them again (and, if they are past their deadline, expires them).
-- A time bound in a WHERE clause is statement_timestamp() here and below, never the
-- volatile clock_timestamp(): only a stable value can bound an index scan.
-- The bridge's statements that touch many rows never wait for a row lock (SKIP LOCKED):
-- a locked row is being answered by a worker right now, and a bridge that waited could
-- deadlock with that worker's answer_batch, which locks its rows in another order. A
-- deadlock stalls both for PostgreSQL's deadlock_timeout (1 s): 66 times the game's
-- timeout, and under load it happened every few seconds (docs/PERFORMANCE.md).
-- ORDER BY and LIMIT make the plan a plain index scan, oldest lease first, at most 1,000 rows a
-- sweep (4 sweeps a second). A bitmap scan, the plan without them, never marks the index
-- entries of rows that left 'processing' as dead, so without a vacuum (autovacuum off, or
-- behind) every sweep read the entry of every row ever claimed: 450,000 a sweep after five
-- minutes at 1,500/s, the service's PostgreSQL CPU per decision 0.13 ms at minute 1 and 0.43
-- at minute 4. An index scan marks them as it passes and steps over them after that.
-- Stepping over them still costs: 3.6 ms a sweep for 66,000 dead entries. So a sweep looks
-- back only %(since_s)s: to where the last complete one ended, less a margin for a claim
-- that committed late (bridge/housekeeping.py); a full look back now and then catches the rest.
WITH stale AS (
    SELECT request_id FROM ai_requests
    WHERE status = 'processing'
      AND claimed_at < statement_timestamp() - make_interval(secs => %(lease_s)s)
      AND claimed_at >= statement_timestamp() - make_interval(secs => %(since_s)s)
    ORDER BY claimed_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE ai_requests AS r
SET status = 'pending'
WHERE r.request_id = ANY (ARRAY(SELECT request_id FROM stale));

-- answer_game_timeouts --
-- Rows the game marked 'timeout' that have no response: never claimed, or claimed in a
-- batch that was lost (past the lease). Each gets its one 255 answer.
-- Never waits for a row lock (see release_stale).
WITH target AS (
    SELECT request_id FROM ai_requests
    WHERE status = 'timeout' AND answered_at IS NULL
      AND (claimed_at IS NULL
           OR claimed_at < statement_timestamp() - make_interval(secs => %(lease_s)s))
    FOR UPDATE SKIP LOCKED
), gave_up AS (
    UPDATE ai_requests AS r
    SET answered_at = clock_timestamp(), claimed_at = coalesce(r.claimed_at, clock_timestamp())
    WHERE r.request_id = ANY (ARRAY(SELECT request_id FROM target))
    RETURNING r.request_id, r.claimed_at
)
INSERT INTO ai_responses (request_id, action_id, confidence, source, reason)
SELECT request_id, 255, 0, 'bridge', 'game_timeout' FROM gave_up
ON CONFLICT (request_id) DO NOTHING;

-- expire_batch --
-- Answer claimed rows 255 without sending them (past the deadline, or no broker).
-- Only rows still 'processing' are touched, so a redelivery writes nothing twice.
-- Never waits for a row lock (see release_stale): a row a worker is answering right now
-- gets that answer instead (the bridge's rescue of a batch that looked lost).
WITH target AS (
    SELECT request_id FROM ai_requests
    WHERE request_id = ANY(%(request_ids)s::integer[]) AND status = 'processing'
    FOR UPDATE SKIP LOCKED
), expired AS (
    UPDATE ai_requests AS r
    SET status = 'expired', answered_at = clock_timestamp()
    WHERE r.request_id = ANY (ARRAY(SELECT request_id FROM target))
    RETURNING r.request_id
)
INSERT INTO ai_responses (request_id, action_id, confidence, source, reason)
SELECT request_id, 255, 0, 'bridge', %(reason)s FROM expired
ON CONFLICT (request_id) DO NOTHING;

-- answer_batch --
-- Write every answer of a batch and close its rows in one statement. Idempotent: the
-- primary key of ai_responses drops a second answer, and a row answered once is never
-- touched again. A row the game marked 'timeout' meanwhile keeps that status but still
-- gets its one answer (answered_at says so); a row whose lease ran out is closed.
-- Only rows claimed with %(token)s (claim_batch) are answered: a forged or replayed
-- message answers nothing. RETURNING: the rows answered, so that the cache is written
-- only for answers the database took.
-- The arrays go in binary (b placeholders): about 40 percent less CPU than text for 64 rows.
WITH answer AS (
    SELECT *
    FROM unnest(%(request_ids)b::integer[], %(action_ids)b::integer[],
                %(confidences)b::real[], %(sources)b::text[], %(models)b::text[],
                %(reasons)b::text[], %(statuses)b::text[])
         AS a(request_id, action_id, confidence, source, model, reason, status)
), closed AS (
    -- The rows by key, each one's status looked up in the arrays: no join whose generic
    -- plan, made on the empty table, could read the whole table per call (tests/flow/test_plans.py).
    UPDATE ai_requests AS r
    SET status = CASE WHEN r.status IN ('processing', 'pending')
                      THEN (%(statuses)b::text[])[
                          array_position(%(request_ids)b::integer[], r.request_id)]
                      ELSE r.status END,
        answered_at = clock_timestamp()
    WHERE r.request_id = ANY (%(request_ids)b::integer[]) AND r.answered_at IS NULL
      AND r.claim_token = %(token)s
    RETURNING r.request_id
)
INSERT INTO ai_responses (request_id, action_id, confidence, source, model, reason)
SELECT a.request_id, a.action_id, a.confidence, a.source, a.model, a.reason
FROM answer AS a
JOIN closed AS c ON c.request_id = a.request_id
ON CONFLICT (request_id) DO NOTHING
RETURNING request_id;

-- delete_finished --
-- Cleanup, in bounded batches so it never holds the queue: finished rows older than
-- the retention go, with their answers (ON DELETE CASCADE).
DELETE FROM ai_requests
WHERE request_id = ANY (ARRAY(
    SELECT request_id
    FROM ai_requests
    WHERE status IN ('completed', 'invalid', 'expired', 'timeout')
      AND created_at < statement_timestamp() - make_interval(secs => %(retention_s)s)
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
));

-- queue_stats --
-- Pending rows and the age of the oldest one, for the bridge's metrics
-- (uses the partial index ai_requests_pending_idx).
SELECT count(*) AS depth,
       coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8 AS oldest_age_s
FROM ai_requests
WHERE status = 'pending';

-- status_queue --
-- `mltasks status`: rows waiting for a bridge (pending) or a worker (processing), and the
-- age in seconds of the oldest pending row (0 when none). The partial indexes on pending
-- and processing rows cover it.
SELECT count(*) FILTER (WHERE status = 'pending') AS pending,
       count(*) FILTER (WHERE status = 'processing') AS processing,
       coalesce(extract(epoch FROM clock_timestamp()
                - min(created_at) FILTER (WHERE status = 'pending'))::float8, 0) AS lag_s
FROM ai_requests
WHERE status IN ('pending', 'processing');

-- status_latency --
-- `mltasks status`: answers to the requests made in the last %(window_s)s seconds, and
-- their latency (answer written minus request inserted, both on the database's clock).
-- Filtering on ai_requests.created_at lets the BRIN index bound the scan to the window.
SELECT count(*) AS answered,
       count(*) FILTER (WHERE s.action_id = 255) AS answered_255,
       avg(extract(epoch FROM s.created_at - r.created_at)::float8) AS avg_s,
       percentile_cont(0.99) WITHIN GROUP (
           ORDER BY extract(epoch FROM s.created_at - r.created_at)::float8) AS p99_s,
       max(extract(epoch FROM s.created_at - r.created_at)::float8) AS max_s
FROM ai_requests AS r
JOIN ai_responses AS s ON s.request_id = r.request_id
WHERE r.created_at >= statement_timestamp() - make_interval(secs => %(window_s)s);

-- bridge_sleeps --
-- This bridge is about to sleep until a NOTIFY: from now on the game's INSERTs notify.
INSERT INTO ai_bridges_waiting (pid) VALUES (pg_backend_pid()) ON CONFLICT (pid) DO NOTHING;

-- bridge_settles --
-- Wait for the inserts that checked for sleeping bridges before this one went on record
-- (they hold the lock shared until they commit; schema.sql ai_requests_notify).
SELECT pg_advisory_lock(827100), pg_advisory_unlock(827100);

-- has_pending --
-- Whether a row waits to be claimed (the last look before sleeping).
SELECT EXISTS (SELECT 1 FROM ai_requests WHERE status = 'pending');

-- bridge_wakes --
-- This bridge works again: it claims without being told. (claim_batch does the same; this
-- is for a bridge that stops, or sleeps no more without claiming.)
DELETE FROM ai_bridges_waiting WHERE pid = pg_backend_pid();

-- forget_gone_bridges --
-- A bridge killed while asleep leaves its row behind (the INSERTs would notify for
-- nobody): rows of backends that no longer exist go.
DELETE FROM ai_bridges_waiting AS w
WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity AS a WHERE a.pid = w.pid);
