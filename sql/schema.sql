-- mltasks schema. Idempotent: `mltasks db init` applies it as often as it likes.
-- The C++ map server's statements (shared/CONTRACT.md) must work on it unchanged.

-- request_id stays in PostgreSQL `integer` range: the game reads it as a 32-bit value.
-- The sequence cycles; a row still holding an id when it comes round is over 2^31
-- requests old and is removed by ai_requests_reuse_id below before the insert.
CREATE SEQUENCE IF NOT EXISTS ai_requests_request_id_seq
    AS integer MINVALUE 1 MAXVALUE 2147483647 CYCLE;

CREATE TABLE IF NOT EXISTS ai_requests (
    request_id   integer PRIMARY KEY DEFAULT nextval('ai_requests_request_id_seq'),
    monster_id   bigint,
    mob_id       integer,
    archetype    text,
    state_vector real[],
    map_id       integer,
    position_x   integer,
    position_y   integer,
    hp_ratio     real,
    sp_ratio     real,
    status       text        NOT NULL DEFAULT 'pending',
    priority     integer     NOT NULL DEFAULT 5,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    claimed_at   timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    CONSTRAINT ai_requests_status_check CHECK (
        status IN ('pending', 'processing', 'completed', 'invalid', 'expired', 'timeout')
    )
);

ALTER SEQUENCE ai_requests_request_id_seq OWNED BY ai_requests.request_id;

-- A queue: every row is updated twice (claimed, answered) within milliseconds of its
-- insert, and deleted after the retention. Vacuum it by the number of dead rows, not by a
-- share of a table whose size swings from empty to millions, and without cost delays, so
-- that the partial indexes the bridge claims through do not fill with dead entries.
ALTER TABLE ai_requests SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0
);

-- When the service wrote this request's one response (NULL: not yet). It is what finds
-- rows the game marked 'timeout' while a batch holding them was lost.
ALTER TABLE ai_requests ADD COLUMN IF NOT EXISTS answered_at timestamptz;

-- The random token of the claim that took this row (claim_batch); an answer must bring
-- it back (answer_batch), so that only rows this service claimed can be answered.
ALTER TABLE ai_requests ADD COLUMN IF NOT EXISTS claim_token text;

-- ANALYZE, small: with the analyze threshold above it comes once a minute under load, in
-- one piece, and every decision answered meanwhile waits with it (docs/PERFORMANCE.md,
-- 2026-12-07 (night)). No statistics on the states: no statement filters, joins or sorts
-- on them, and their element statistics were most of the cost. A sample of 3,000 rows
-- (300 x the largest target) for the rest: the service's plans do not depend on the
-- statistics (tests/flow/test_plans.py), and 3,000 rows tell the status shares well
-- enough. On 240,000 rows of a bulk run: 188-212 ms of a core at the defaults, 22 ms so.
-- A column added later needs its line here (tests/flow/test_schema.py checks).
ALTER TABLE ai_requests
    ALTER COLUMN state_vector SET STATISTICS 0,
    ALTER COLUMN request_id SET STATISTICS 10,
    ALTER COLUMN monster_id SET STATISTICS 10,
    ALTER COLUMN mob_id SET STATISTICS 10,
    ALTER COLUMN archetype SET STATISTICS 10,
    ALTER COLUMN map_id SET STATISTICS 10,
    ALTER COLUMN position_x SET STATISTICS 10,
    ALTER COLUMN position_y SET STATISTICS 10,
    ALTER COLUMN hp_ratio SET STATISTICS 10,
    ALTER COLUMN sp_ratio SET STATISTICS 10,
    ALTER COLUMN status SET STATISTICS 10,
    ALTER COLUMN priority SET STATISTICS 10,
    ALTER COLUMN created_at SET STATISTICS 10,
    ALTER COLUMN claimed_at SET STATISTICS 10,
    ALTER COLUMN attempts SET STATISTICS 10,
    ALTER COLUMN answered_at SET STATISTICS 10,
    ALTER COLUMN claim_token SET STATISTICS 10;

-- What the bridge claims: most urgent first, oldest first within a priority.
CREATE INDEX IF NOT EXISTS ai_requests_pending_idx
    ON ai_requests (priority DESC, created_at) WHERE status = 'pending';
-- Rows whose lease may have run out.
CREATE INDEX IF NOT EXISTS ai_requests_processing_idx
    ON ai_requests (claimed_at) WHERE status = 'processing';
-- Rows the game gave up on that have no response yet (unclaimed, or their batch was lost).
DROP INDEX IF EXISTS ai_requests_unclaimed_timeout_idx;
CREATE INDEX IF NOT EXISTS ai_requests_unanswered_timeout_idx
    ON ai_requests (claimed_at) WHERE status = 'timeout' AND answered_at IS NULL;
-- Cleanup by age; BRIN because rows arrive in time order and it costs inserts nothing.
CREATE INDEX IF NOT EXISTS ai_requests_created_brin
    ON ai_requests USING brin (created_at);

-- One answer per request at most (the primary key); the answer goes with its request.
CREATE TABLE IF NOT EXISTS ai_responses (
    request_id integer PRIMARY KEY
        REFERENCES ai_requests (request_id) ON DELETE CASCADE,
    -- The game parses these with std::stoi / std::stof: never NULL, never out of range.
    action_id  integer NOT NULL
        CONSTRAINT ai_responses_action_check CHECK (action_id BETWEEN 0 AND 9 OR action_id = 255),
    confidence real    NOT NULL
        CONSTRAINT ai_responses_confidence_check CHECK (confidence >= 0 AND confidence <= 1),
    source     text    NOT NULL,  -- model | rules | cache | bridge
    model      text,              -- <archetype>/<model_type> when a model answered
    reason     text,              -- why a 255 was given
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

ALTER TABLE ai_responses SET (
    autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 10000,
    autovacuum_vacuum_insert_scale_factor = 0, autovacuum_vacuum_insert_threshold = 20000,
    autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 20000,
    autovacuum_vacuum_cost_delay = 0
);

-- ANALYZE, small, as for ai_requests (its rows are read by their key only): 16-32 ms on a
-- bulk run's 240,000 answers, against 80-145 ms at the default targets.
ALTER TABLE ai_responses
    ALTER COLUMN request_id SET STATISTICS 10,
    ALTER COLUMN action_id SET STATISTICS 10,
    ALTER COLUMN confidence SET STATISTICS 10,
    ALTER COLUMN source SET STATISTICS 10,
    ALTER COLUMN model SET STATISTICS 10,
    ALTER COLUMN reason SET STATISTICS 10,
    ALTER COLUMN created_at SET STATISTICS 10;

-- Wrap-around: free the id the sequence just handed out if an ancient row still holds it,
-- so the game's INSERT never fails and never reads a stale answer for a new request.
-- It runs in the game's sessions, for every insert: PL/pgSQL keeps the plan it made for
-- the DELETE, and one made while the table was empty seq-scanned the whole table on every
-- later insert (5,000 inserts into 5,000 rows: 10.9 s instead of 0.12 s). Seq scans priced
-- out, the plan is the primary key's index scan whatever the statistics say.
CREATE OR REPLACE FUNCTION ai_requests_reuse_id() RETURNS trigger
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
BEGIN
    DELETE FROM ai_requests WHERE request_id = NEW.request_id;
    RETURN NEW;
END;
$$;

-- Bridges that sleep, waiting for work (one row per bridge connection, its backend pid).
-- A NOTIFY is not free: PostgreSQL serialises the commits of every transaction that
-- issued one (a database-wide lock held through the WAL flush), so the game's INSERTs
-- notify only while a bridge sleeps. A busy bridge claims again without being told.
CREATE UNLOGGED TABLE IF NOT EXISTS ai_bridges_waiting (
    pid   integer PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Wake the sleeping bridges: one notification per insert statement, only when one sleeps.
-- The shared advisory lock (held until the insert commits) closes the race with a bridge
-- going to sleep: the bridge records itself, then takes the same lock exclusively, which
-- waits for every insert already past this check; only then does it look for pending rows
-- one last time (bridge_sleeps, bridge_settles, has_pending in queries.sql).
CREATE OR REPLACE FUNCTION ai_requests_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(827100);
    IF EXISTS (SELECT 1 FROM ai_bridges_waiting) THEN
        PERFORM pg_notify('ai_requests', '');
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER ai_requests_reuse_id
    BEFORE INSERT ON ai_requests
    FOR EACH ROW EXECUTE FUNCTION ai_requests_reuse_id();

CREATE OR REPLACE TRIGGER ai_requests_notify
    AFTER INSERT ON ai_requests
    FOR EACH STATEMENT EXECUTE FUNCTION ai_requests_notify();

-- Experience (issue 29): answered decisions kept as transitions (state, action, next state)
-- for the next model, moved here from ai_requests/ai_responses by `mltasks experience record`
-- (sql/experience.sql), a process of its own: nothing here is on the answer path, and the
-- game's tables get no trigger, index or column for it.
-- UNLOGGED (both tables of rows): they write no WAL, so the game's INSERTs, which commit
-- with a WAL flush, never flush the recorder's rows too, and recording costs less. The price:
-- a PostgreSQL crash (not a clean restart) empties them; it is training data, not the game's.
CREATE UNLOGGED TABLE IF NOT EXISTS ai_experience (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- order of recording
    request_id   integer     NOT NULL,
    monster_id   bigint      NOT NULL,
    archetype    text        NOT NULL,
    state        real[]      NOT NULL,  -- 64 finite values (checked when recorded)
    action_id    integer     NOT NULL,  -- 0-9, or 255: the game used its own AI
    next_state   real[]      NOT NULL,  -- the state of the same monster_id's next request
    source       text        NOT NULL,  -- ai_responses.source: model | rules | cache | bridge
    model        text,                  -- ai_responses.model: types and versions that answered
    reason       text,                  -- ai_responses.reason: why a 255
    confidence   real        NOT NULL,
    status       text        NOT NULL,  -- completed | expired | timeout (the game gave up)
    latency_ms   real        NOT NULL,  -- answer written - request inserted
    requested_at timestamptz NOT NULL,
    next_at      timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS ai_experience_requested_brin
    ON ai_experience USING brin (requested_at);

-- Each monster's last recorded decision, waiting for its next state (one row a monster_id).
CREATE UNLOGGED TABLE IF NOT EXISTS ai_experience_waiting (
    monster_id   bigint PRIMARY KEY,
    request_id   integer     NOT NULL,
    archetype    text        NOT NULL,
    state        real[]      NOT NULL,
    action_id    integer     NOT NULL,
    source       text        NOT NULL,
    model        text,
    reason       text,
    confidence   real        NOT NULL,
    status       text        NOT NULL,
    latency_ms   real        NOT NULL,
    requested_at timestamptz NOT NULL
);
-- The rows that waited longer than experience.pair_wait_s (experience_record's given_up).
CREATE INDEX IF NOT EXISTS ai_experience_waiting_requested_idx
    ON ai_experience_waiting (requested_at);

-- The recorder's high-water mark: requests created up to recorded_to have been read. Logged:
-- after a crash, recording goes on from where it was (the rows before it are lost).
CREATE TABLE IF NOT EXISTS ai_experience_mark (
    only_row    boolean PRIMARY KEY DEFAULT true CONSTRAINT ai_experience_mark_one CHECK (only_row),
    recorded_to timestamptz,  -- NULL: never ran; the first round starts from its own time
    updated_at  timestamptz
);
INSERT INTO ai_experience_mark DEFAULT VALUES ON CONFLICT DO NOTHING;
