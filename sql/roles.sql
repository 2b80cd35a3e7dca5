-- Roles and privileges, applied by `mltasks db init` through a superuser connection.
-- Blocks as in queries.sql; {owner}, {runtime} and {database} are identifiers, quoted by
-- psycopg.sql before they go in (identifiers cannot be bound parameters).
--
-- The owner role owns the database, the tables, the sequence and the trigger functions;
-- it cannot log in, and `db init` acts as it (SET ROLE). The runtime role (the service's,
-- and the game's when it shares it) runs only the statements of sql/queries.sql and of
-- the game's contract: it cannot drop, alter or replace anything.

-- take_over_legacy --
-- An install from before the owner role: what the runtime role owns in this database (the
-- tables, the sequence, the functions, the database itself) passes to the owner role.
REASSIGN OWNED BY {runtime} TO {owner};

-- owner_may_create --
-- The owner applies the schema in public (a database made by someone else: PostgreSQL 15
-- gives CREATE on public only to the database's owner).
GRANT USAGE, CREATE ON SCHEMA public TO {owner};

-- grant_runtime --
-- Exactly what the service and the game run: rows in and out of both tables, ids from
-- the sequence. Nobody else creates objects in public.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CONNECT ON DATABASE {database} TO {runtime};
GRANT USAGE ON SCHEMA public TO {runtime};
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE ai_requests, ai_responses TO {runtime};
GRANT SELECT, INSERT, DELETE ON TABLE ai_bridges_waiting TO {runtime};
GRANT USAGE, SELECT ON SEQUENCE ai_requests_request_id_seq TO {runtime};
-- The experience recorder (sql/experience.sql) runs as the runtime role too: it reads the
-- game's two tables (granted above) and keeps its own three; cleanup reads the mark.
GRANT SELECT, INSERT, DELETE ON TABLE ai_experience TO {runtime};
GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE ai_experience_waiting TO {runtime};
GRANT SELECT, UPDATE ON TABLE ai_experience_mark TO {runtime};
