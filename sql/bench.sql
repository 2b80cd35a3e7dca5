-- Statements of the benchmark (mltasks/bench), one named block each, same format as
-- queries.sql. They are not the service's: they measure against it.

-- floor_answer --
-- The floor: the least a responder can do per request. Claims up to %(limit)s pending
-- rows in the bridge's order, closes them and answers them with a fixed action, all in
-- one statement (one round trip, one commit). Whatever the service costs on top of this
-- is the price of routing, batching and inference. Like claim_batch, it takes the
-- floor off the sleepers' record (`woke`) in the same round trip.
WITH woke AS (
    DELETE FROM ai_bridges_waiting WHERE pid = pg_backend_pid()
), picked AS (
    SELECT request_id
    FROM ai_requests
    WHERE status = 'pending'
    ORDER BY priority DESC, created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), closed AS (
    UPDATE ai_requests AS r
    SET status = 'completed', claimed_at = clock_timestamp(), attempts = r.attempts + 1
    FROM picked
    WHERE r.request_id = picked.request_id
    RETURNING r.request_id
)
INSERT INTO ai_responses (request_id, action_id, confidence, source)
SELECT request_id, %(action_id)s, 1, 'floor' FROM closed
ON CONFLICT (request_id) DO NOTHING;

-- broker_floor_claim --
-- The broker floor's bridge (mltasks/bench/brokerfloor.py): claim_batch's SKIP LOCKED
-- claim and nothing else. States leave as array_send bytes, decoded by the worker with
-- numpy: no Python float is built. Like claim_batch it takes the bridge off the
-- sleepers' record (`woke`) in the same round trip.
WITH woke AS (
    DELETE FROM ai_bridges_waiting WHERE pid = pg_backend_pid()
), picked AS (
    SELECT request_id
    FROM ai_requests
    WHERE status = 'pending'
    ORDER BY priority DESC, created_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE ai_requests AS r
SET status = 'processing', claimed_at = clock_timestamp(), attempts = r.attempts + 1
FROM picked
WHERE r.request_id = picked.request_id
RETURNING r.request_id, array_send(r.state_vector);

-- broker_floor_answer --
-- The broker floor's worker: a whole batch answered and its rows closed in one statement
-- (a row the game gave up on keeps its 'timeout'). Arrays in binary, as answer_batch.
WITH answer AS (
    SELECT *
    FROM unnest(%(ids)b::integer[], %(actions)b::integer[], %(confs)b::real[])
         AS a(request_id, action_id, confidence)
), closed AS (
    UPDATE ai_requests AS r
    SET status = CASE WHEN r.status = 'processing' THEN 'completed' ELSE r.status END,
        answered_at = clock_timestamp()
    FROM answer AS a
    WHERE r.request_id = a.request_id
)
INSERT INTO ai_responses (request_id, action_id, confidence, source)
SELECT request_id, action_id, confidence, %(source)s FROM answer
ON CONFLICT (request_id) DO NOTHING;

-- reset_tables --
-- A fresh table for each run; ids start again at 1.
TRUNCATE ai_responses, ai_requests RESTART IDENTITY;

-- request_statuses --
-- Where the requests of a run ended.
SELECT status, count(*) FROM ai_requests GROUP BY status ORDER BY status;

-- response_sources --
-- Who answered the requests of a run, and how often with 255.
SELECT source, count(*), count(*) FILTER (WHERE action_id = 255)
FROM ai_responses GROUP BY source ORDER BY source;

-- batch_fresh --
-- `mltasks bench batch`: the rows just inserted made as young as the claim that follows.
UPDATE ai_requests SET created_at = clock_timestamp() WHERE status = 'pending';

-- batch_not_inferred --
-- `mltasks bench batch`: answers no model gave (a 255: a row the task skipped).
SELECT count(*) FROM ai_responses WHERE source <> 'model' OR action_id NOT BETWEEN 0 AND 9;

-- warm_up_answer --
-- The warm-up request's answer, who gave it and why: a 'bridge' 255 means the worker was
-- not up, unless the reason is the fallback level 5 the run asked for.
SELECT action_id, confidence, source, reason FROM ai_responses WHERE request_id = %(request_id)s;

-- bulk_copy --
-- The bulk load: many map servers' INSERTs at once, as one COPY per scheduled batch. The
-- row and statement triggers fire as for the game's INSERT (id reuse, one NOTIFY per
-- batch); created_at is each row's own clock_timestamp(), taken as it is written.
COPY ai_requests (monster_id, mob_id, archetype, state_vector,
                  map_id, position_x, position_y, hp_ratio, sp_ratio, status, priority)
FROM STDIN;

-- bulk_unanswered --
-- Requests of the run still without a response (the run drains until none is left).
SELECT count(*) FROM ai_requests AS r
WHERE NOT EXISTS (SELECT 1 FROM ai_responses AS s WHERE s.request_id = r.request_id);

-- bulk_results --
-- Every request of a bulk run, timed by the database's own clock: when it was written,
-- how long until its response was written (NULL: none), and what the response was.
SELECT extract(epoch FROM r.created_at)::float8 AS created_s,
       (extract(epoch FROM s.created_at - r.created_at) * 1000.0)::float8 AS latency_ms,
       s.action_id, s.source, s.reason
FROM ai_requests AS r
LEFT JOIN ai_responses AS s USING (request_id)
ORDER BY r.created_at;

-- chaos_audit --
-- `mltasks bench chaos`: what the table holds once the run settled. Unanswered: a row
-- without its response; stuck: still pending or processing; malformed: an answer the map
-- server must not read (std::stoi / std::stof, or outside the contract's ranges).
SELECT count(*) AS requests,
       count(*) FILTER (WHERE s.request_id IS NULL) AS unanswered,
       count(*) FILTER (WHERE r.status IN ('pending', 'processing')) AS stuck,
       count(*) FILTER (WHERE s.request_id IS NOT NULL
                        AND (s.action_id IS NULL OR s.confidence IS NULL
                             OR NOT (s.action_id BETWEEN 0 AND 9 OR s.action_id = 255)
                             OR s.confidence < 0 OR s.confidence > 1
                             OR s.confidence <> s.confidence)) AS malformed,
       count(*) FILTER (WHERE s.action_id = 255) AS answered_255,
       -- first claims only: a claim after a lease ran out is late by design
       count(*) FILTER (WHERE r.attempts <= 1 AND r.claimed_at - r.created_at
                        > make_interval(secs => %(deadline_s)s)) AS held_past_deadline
FROM ai_requests AS r
LEFT JOIN ai_responses AS s ON s.request_id = r.request_id;

-- chaos_duplicates --
-- Requests with more than one response (the primary key forbids it: this proves it).
SELECT count(*) FROM (
    SELECT request_id FROM ai_responses GROUP BY request_id HAVING count(*) > 1
) AS d;

-- chaos_unsettled --
-- Rows still waiting for their one answer.
SELECT count(*) FROM ai_requests AS r
WHERE r.status IN ('pending', 'processing')
   OR NOT EXISTS (SELECT 1 FROM ai_responses AS s WHERE s.request_id = r.request_id);

-- chaos_reasons --
-- Why answers were 255, for the report.
SELECT coalesce(s.reason, ''), count(*)
FROM ai_responses AS s
WHERE s.action_id = 255
GROUP BY 1
ORDER BY 2 DESC;

-- run_backends --
-- The backends serving the run's database (mltasks/bench/cpucost.py reads their CPU time)
-- and whose they are: a responder's processes connect as 'mltasks-bench <name>'.
SELECT pid, application_name
FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
  AND pid <> pg_backend_pid();

-- statements_enable --
-- In the bench database only; it works without the preload (the view then refuses).
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;

-- statements_snapshot --
-- Calls and execution time so far of every statement run in this database, but this one.
SELECT queryid, calls, total_exec_time, query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND position('pg_stat_statements' IN query) = 0;
