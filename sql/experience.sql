-- Experience recording (issue 29; mltasks/experience/). Named blocks as in queries.sql,
-- loaded with them by mltasks/sql.py. Every statement runs in the recorder's own process
-- and connection: none is on the answer path. It reads ai_requests and ai_responses
-- (ACCESS SHARE, no row locks: the bridge's claims and the workers' answers never wait
-- for it) and writes only its own tables (sql/schema.sql, at the end).

-- experience_lock --
-- One recorder at a time: a second one skips its round instead of recording rows twice.
SELECT pg_try_advisory_xact_lock(827102) AS held;

-- experience_window --
-- This round's window of request times: after the high-water mark, up to `settle_s` ago
-- (every answer of the window, or its 255, is written by then), at most `window_s` long so
-- that a recorder catching up after an outage moves in bounded statements. A first round
-- (no mark yet) starts at its own end: recording begins now, not an hour in the past.
-- behind_s: how far the window's end is from where it could be (a recorder catching up
-- runs its next round at once).
SELECT lo, greatest(lo, least(hi, lo + make_interval(secs => %(window_s)s))) AS hi,
       extract(epoch FROM hi - greatest(lo, least(hi, lo + make_interval(secs => %(window_s)s))))::float8
           AS behind_s
FROM (
    SELECT coalesce(recorded_to, clock_timestamp() - make_interval(secs => %(settle_s)s)) AS lo,
           clock_timestamp() - make_interval(secs => %(settle_s)s) AS hi
    FROM ai_experience_mark
) AS m;

-- experience_record --
-- Move the answered requests of the window (lo, hi] into ai_experience, set-based: no value
-- leaves PostgreSQL. A state that is not 64 finite values (or a row the service refused as
-- invalid, with no monster_id, or of an unknown archetype) is not recorded and is counted
-- under its reason. Each good row is paired with the next good row of the same monster_id
-- (LEAD over the monster's rows by time): that row's state is its next_state. A monster's
-- last row waits in ai_experience_waiting for its next (the next rounds), and is dropped,
-- counted 'unpaired', when none came within `pair_wait_s`. Only the waiting rows of the
-- monsters in the window are read (by primary key), however many monsters wait.
-- Returns (what, reason, n): recorded per source, rejected per reason, dropped unpaired.
WITH fresh AS (
    SELECT r.request_id, r.monster_id, r.archetype, r.state_vector AS state, r.status,
           r.created_at AS requested_at, s.action_id, s.confidence, s.source, s.model,
           s.reason, (extract(epoch FROM s.created_at - r.created_at) * 1000)::real AS latency_ms,
           CASE
               WHEN r.status = 'invalid' THEN 'invalid'
               WHEN r.monster_id IS NULL THEN 'no_monster'
               WHEN r.archetype IS NULL OR NOT r.archetype = ANY (%(archetypes)s::text[])
                   THEN 'archetype'
               WHEN r.state_vector IS NULL OR array_ndims(r.state_vector) IS DISTINCT FROM 1
                    OR array_length(r.state_vector, 1) <> 64 THEN 'wrong_length'
               WHEN array_position(r.state_vector, NULL) IS NOT NULL THEN 'null_value'
               WHEN r.state_vector && '{NaN,Infinity,-Infinity}'::real[] THEN 'not_finite'
           END AS rejected
    FROM ai_requests AS r
    -- Each request's response by its key (OFFSET 0 keeps it a lookup per request): a
    -- plan made on the empty tables otherwise joined both whole primary keys, row by
    -- row (2.9 s for a round of 2,000 on 20,000 rows; docs/PERFORMANCE.md).
    CROSS JOIN LATERAL (
        SELECT action_id, confidence, source, model, reason, created_at
        FROM ai_responses WHERE request_id = r.request_id OFFSET 0
    ) AS s
    WHERE r.created_at > %(lo)s AND r.created_at <= %(hi)s
), sequence AS (
    SELECT w.request_id, w.monster_id, w.archetype, w.state, w.status, w.requested_at,
           w.action_id, w.confidence, w.source, w.model, w.reason, w.latency_ms, false AS fresh
    FROM (SELECT DISTINCT monster_id FROM fresh WHERE rejected IS NULL) AS f
    CROSS JOIN LATERAL (  -- by key, per monster of the window
        SELECT * FROM ai_experience_waiting WHERE monster_id = f.monster_id OFFSET 0
    ) AS w
    UNION ALL
    SELECT request_id, monster_id, archetype, state, status, requested_at, action_id,
           confidence, source, model, reason, latency_ms, true AS fresh
    FROM fresh
    WHERE rejected IS NULL
), paired AS (
    SELECT *, lead(state) OVER w AS next_state, lead(requested_at) OVER w AS next_at
    FROM sequence
    WINDOW w AS (PARTITION BY monster_id ORDER BY requested_at, request_id)
), recorded AS (
    INSERT INTO ai_experience (request_id, monster_id, archetype, state, action_id, next_state,
                               source, model, reason, confidence, status, latency_ms,
                               requested_at, next_at)
    SELECT request_id, monster_id, archetype, state, action_id, next_state, source, model,
           reason, confidence, status, latency_ms, requested_at, next_at
    FROM paired
    WHERE next_state IS NOT NULL
    ORDER BY requested_at, request_id
    RETURNING source
), waits AS (
    INSERT INTO ai_experience_waiting (monster_id, request_id, archetype, state, action_id,
                                       source, model, reason, confidence, status, latency_ms,
                                       requested_at)
    SELECT monster_id, request_id, archetype, state, action_id, source, model, reason,
           confidence, status, latency_ms, requested_at
    FROM paired
    WHERE next_state IS NULL AND fresh
    ON CONFLICT (monster_id) DO UPDATE
    SET request_id = EXCLUDED.request_id, archetype = EXCLUDED.archetype,
        state = EXCLUDED.state, action_id = EXCLUDED.action_id, source = EXCLUDED.source,
        model = EXCLUDED.model, reason = EXCLUDED.reason, confidence = EXCLUDED.confidence,
        status = EXCLUDED.status, latency_ms = EXCLUDED.latency_ms,
        requested_at = EXCLUDED.requested_at
    RETURNING 1
), given_up AS (
    -- Set-based (EXCEPT hashes): never every waiting row against every fresh one.
    DELETE FROM ai_experience_waiting AS w
    WHERE w.monster_id = ANY (ARRAY(
        SELECT monster_id FROM ai_experience_waiting
        WHERE requested_at <= %(hi)s::timestamptz - make_interval(secs => %(pair_wait_s)s)
        EXCEPT
        SELECT monster_id FROM fresh WHERE rejected IS NULL
    ))
    RETURNING 1
)
SELECT 'recorded' AS what, source AS reason, count(*) AS n FROM recorded GROUP BY source
UNION ALL
SELECT 'rejected', rejected, count(*) FROM fresh WHERE rejected IS NOT NULL GROUP BY rejected
UNION ALL
SELECT 'dropped', 'unpaired', count(*) FROM given_up
UNION ALL
SELECT 'waiting', 'updated', count(*) FROM waits;

-- experience_trim_age --
-- Retention: of the `limit` oldest transitions, those recorded for requests older than
-- `retention_s` go (oldest first; reads at most `limit` rows however large the table is).
WITH oldest AS (
    SELECT id, requested_at FROM ai_experience ORDER BY id LIMIT %(limit)s
)
DELETE FROM ai_experience AS e
USING oldest AS o
WHERE e.id = o.id
  AND o.requested_at < statement_timestamp() - make_interval(secs => %(retention_s)s);

-- experience_trim_cap --
-- The size cap: the oldest transitions beyond the newest `max_rows` go, `limit` at most.
-- Ids are given in order, so the ids above max(id) - max_rows are the newest max_rows
-- (fewer when a failed round left a gap: the cap is never exceeded).
DELETE FROM ai_experience
WHERE id IN (
    SELECT id FROM ai_experience
    WHERE id <= (SELECT max(id) FROM ai_experience) - %(max_rows)s
    ORDER BY id
    LIMIT %(limit)s
);

-- experience_advance --
-- The round is done: requests up to `hi` have been read.
UPDATE ai_experience_mark
SET recorded_to = greatest(coalesce(recorded_to, %(hi)s), %(hi)s), updated_at = clock_timestamp();

-- experience_size --
-- For the recorder's gauges: transitions kept (an upper bound: ids are in order), monsters
-- waiting for their next state, and how far behind the game's time the mark is.
SELECT (SELECT coalesce(max(id) - min(id) + 1, 0) FROM ai_experience) AS kept,
       (SELECT count(*) FROM ai_experience_waiting) AS waiting,
       (SELECT coalesce(extract(epoch FROM clock_timestamp() - recorded_to), 0)::float8
        FROM ai_experience_mark) AS lag_s;

-- experience_archetypes --
-- The archetypes `mltasks experience export` writes a file for.
SELECT DISTINCT archetype FROM ai_experience ORDER BY archetype;

-- experience_export --
-- One archetype's transitions, oldest first. The states leave as bytea of big-endian
-- float4 (float4send): numpy reads them as they are stored, no text and no Python floats.
SELECT (SELECT string_agg(float4send(x), ''::bytea ORDER BY i)
        FROM unnest(state) WITH ORDINALITY AS u(x, i)) AS state,
       (SELECT string_agg(float4send(x), ''::bytea ORDER BY i)
        FROM unnest(next_state) WITH ORDINALITY AS u(x, i)) AS next_state,
       action_id, source, coalesce(model, '') AS model, coalesce(reason, '') AS reason,
       confidence, latency_ms, status <> 'timeout' AS applied, monster_id, request_id,
       extract(epoch FROM requested_at)::float8 AS requested_at
FROM ai_experience
WHERE archetype = %(archetype)s
ORDER BY id;

-- delete_finished_recorded --
-- Cleanup while experience is recorded: as delete_finished, but a finished request the
-- recorder has not read yet (created after its mark) stays up to `hold_s` longer than the
-- retention. A recorder that is down for good therefore holds nothing past that.
DELETE FROM ai_requests
WHERE request_id = ANY (ARRAY(
    SELECT request_id
    FROM ai_requests
    WHERE status IN ('completed', 'invalid', 'expired', 'timeout')
      AND created_at < statement_timestamp() - make_interval(secs => %(retention_s)s)
      AND (created_at <= (SELECT recorded_to FROM ai_experience_mark)
           OR created_at < statement_timestamp() - make_interval(secs => %(retention_s)s + %(hold_s)s))
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
));
