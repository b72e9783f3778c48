-- phase: prepare
-- prepare orders_v2: green "public"."orders_v2" and forward triggers on "public"."orders"
BEGIN;
SET LOCAL lock_timeout = '2s';
-- serialize journal creation between concurrent bgsync processes
SELECT pg_advisory_xact_lock(hashtext('bgsync journal'));
-- state schema
CREATE SCHEMA IF NOT EXISTS "bgsync";
-- migrations and their phase
CREATE TABLE IF NOT EXISTS "bgsync"."migrations" (
    name        text PRIMARY KEY,
    source      text NOT NULL,
    target      text NOT NULL,
    phase       text NOT NULL,
    plan_hash   text NOT NULL,
    plan        jsonb NOT NULL,
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- only one active migration per source table
CREATE UNIQUE INDEX IF NOT EXISTS migrations_one_active_per_source
    ON "bgsync"."migrations" (source) WHERE phase NOT IN ('rolled_back', 'finalized');
-- backfill chunks; progress is committed with the rows it describes
CREATE TABLE IF NOT EXISTS "bgsync"."chunks" (
    migration    text NOT NULL REFERENCES "bgsync"."migrations" (name) ON DELETE CASCADE,
    chunk_no     integer NOT NULL,
    lo           text[],
    hi           text[],
    cursor       text[],
    step         numeric,
    done         boolean NOT NULL DEFAULT false,
    rows_copied  bigint NOT NULL DEFAULT 0,
    rows_seen    bigint NOT NULL DEFAULT 0,
    batches      integer NOT NULL DEFAULT 0,
    started_at   timestamptz,
    finished_at  timestamptz,
    PRIMARY KEY (migration, chunk_no)
);
-- event log of every statement run
CREATE TABLE IF NOT EXISTS "bgsync"."events" (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    migration    text,
    phase        text,
    step         text,
    statement    text,
    duration_ms  numeric,
    outcome      text NOT NULL,
    detail       text,
    backend_pid  integer NOT NULL DEFAULT pg_backend_pid()
);
-- verify results: one row per run, the mismatches and the ranges that hold them
CREATE TABLE IF NOT EXISTS "bgsync"."verify_runs" (
    id           bigserial PRIMARY KEY,
    migration    text NOT NULL REFERENCES "bgsync"."migrations" (name) ON DELETE CASCADE,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    passed       boolean NOT NULL,
    result       jsonb NOT NULL
);
-- what the last cutover renamed, so that rollback undoes exactly that
ALTER TABLE "bgsync"."migrations" ADD COLUMN IF NOT EXISTS cutover jsonb;
-- when bgsync last wrote green itself (a backfill, a repair): verify waits for older snapshots
ALTER TABLE "bgsync"."migrations" ADD COLUMN IF NOT EXISTS green_written_at timestamptz;
-- the plan file as prepare read it, for `bgsync plan show` (NULL in journals from before it was kept)
ALTER TABLE "bgsync"."migrations" ADD COLUMN IF NOT EXISTS plan_source text;
-- blue's own timing of its foreign keys on itself, while bgsync has them checked at commit (blue written by the sync)
ALTER TABLE "bgsync"."migrations" ADD COLUMN IF NOT EXISTS self_keys jsonb;
-- the pause flag: set by `bgsync pause`, read by every backfill worker of every process between batches
ALTER TABLE "bgsync"."migrations" ADD COLUMN IF NOT EXISTS paused_at timestamptz;
-- running backfill processes, each with its heartbeat and what holds it
CREATE TABLE IF NOT EXISTS "bgsync"."runs" (
    id            bigserial PRIMARY KEY,
    migration     text NOT NULL REFERENCES "bgsync"."migrations" (name) ON DELETE CASCADE,
    command       text NOT NULL,
    backend_pid   integer NOT NULL DEFAULT pg_backend_pid(),
    client        text,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    heartbeat_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended_at      timestamptz,
    held          text,
    held_seconds  float8 NOT NULL DEFAULT 0,
    rows_copied   bigint NOT NULL DEFAULT 0
);
-- the global rate limit: the timeline that every worker of every process books its batches on
CREATE TABLE IF NOT EXISTS "bgsync"."rate_limits" (
    migration     text PRIMARY KEY REFERENCES "bgsync"."migrations" (name) ON DELETE CASCADE,
    booked_until  timestamptz NOT NULL
);
-- journal format version
COMMENT ON SCHEMA "bgsync" IS 'bgsync state (format 1)';
-- green's own sequence for id (blue's is public.orders_id_seq)
CREATE SEQUENCE "public"."orders_v2_id_seq";
-- create green "public"."orders_v2" (its primary key and indexes are built after the bulk copy)
CREATE TABLE "public"."orders_v2" (
    "id" bigint NOT NULL DEFAULT nextval('"public"."orders_v2_id_seq"'::regclass),
    "customer_id" bigint NOT NULL,
    "total_amount" numeric(12,2) NOT NULL,
    "status" text NOT NULL DEFAULT 'new',
    "note" text,
    "created_at" timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT "orders_total_amount_nonneg" CHECK (total_amount >= 0)
);
-- the sequence belongs to green's column
ALTER SEQUENCE "public"."orders_v2_id_seq" OWNED BY "public"."orders_v2"."id";
-- bulk mode: the keys blue's writers change while green fills (re-read from blue before the switch to dual write)
CREATE TABLE "bgsync"."orders_v2_log" (
    "id" bigint
);
-- forward sync function, bulk mode: records the keys each statement on "public"."orders" changes in "bgsync"."orders_v2_log", in the same transaction (SECURITY DEFINER: writers of blue need no right on bgsync's schema)
CREATE OR REPLACE FUNCTION "bgsync"."orders_v2_forward"() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = "pg_catalog", "public", "pg_temp"
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_seqscan = off
SET jit = off
AS $bgsync$
BEGIN
    -- every key a statement touches (both keys of a re-keyed row) is re-read from blue before the switch
    CASE TG_OP
    WHEN 'INSERT' THEN
        INSERT INTO "bgsync"."orders_v2_log" ("id")
        SELECT "id" FROM bgsync_new_rows;
    WHEN 'UPDATE' THEN
        INSERT INTO "bgsync"."orders_v2_log" ("id")
        SELECT "id" FROM bgsync_new_rows
        UNION ALL
        SELECT o."id" FROM bgsync_old_rows AS o
         WHERE NOT EXISTS (SELECT FROM "public"."orders" AS s
                            WHERE (s."id") = (o."id")
                              AND pg_catalog.age(s.xmin) <= 0);
    WHEN 'DELETE' THEN
        INSERT INTO "bgsync"."orders_v2_log" ("id")
        SELECT "id" FROM bgsync_old_rows;
    ELSE    -- TRUNCATE
        TRUNCATE "public"."orders_v2", "bgsync"."orders_v2_log";
    END CASE;
    RETURN NULL;
END
$bgsync$;
-- forward sync trigger for INSERT
CREATE TRIGGER "bgsync_orders_v2_fwd_ins" AFTER INSERT ON "public"."orders"
    REFERENCING NEW TABLE AS bgsync_new_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_forward"();
-- forward sync trigger for UPDATE (including key changes)
CREATE TRIGGER "bgsync_orders_v2_fwd_upd" AFTER UPDATE ON "public"."orders"
    REFERENCING OLD TABLE AS bgsync_old_rows NEW TABLE AS bgsync_new_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_forward"();
-- forward sync trigger for DELETE
CREATE TRIGGER "bgsync_orders_v2_fwd_del" AFTER DELETE ON "public"."orders"
    REFERENCING OLD TABLE AS bgsync_old_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_forward"();
-- forward sync trigger for TRUNCATE
CREATE TRIGGER "bgsync_orders_v2_fwd_trunc" AFTER TRUNCATE ON "public"."orders"
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_forward"();
-- keep the forward sync ins trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_fwd_ins";
-- keep the forward sync upd trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_fwd_upd";
-- keep the forward sync del trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_fwd_del";
-- keep the forward sync trunc trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_fwd_trunc";
-- register the migration (refused by a unique index if another one is active on the source)
INSERT INTO "bgsync"."migrations" (name, source, target, phase, plan_hash, plan, spec, plan_source)
VALUES ('orders_v2', '"public"."orders"', '"public"."orders_v2"', 'prepared', '71c1a68d96fb6123',
        '{"checks": [{"expression": "total_amount >= 0", "name": "orders_total_amount_nonneg"}], "columns": [{"default": null, "from": null, "name": "id", "not_null": true, "reverse": null, "reverse_column": null, "type": "bigint"}, {"default": null, "from": null, "name": "customer_id", "not_null": true, "reverse": null, "reverse_column": null, "type": "bigint"}, {"default": null, "from": "amount::numeric(12,2)", "name": "total_amount", "not_null": true, "reverse": "round(total_amount)::integer", "reverse_column": "amount", "type": "numeric(12,2)"}, {"default": "''new''", "from": "state", "name": "status", "not_null": true, "reverse": null, "reverse_column": null, "type": "text"}, {"default": null, "from": null, "name": "note", "not_null": false, "reverse": null, "reverse_column": null, "type": "text"}, {"default": "now()", "from": null, "name": "created_at", "not_null": true, "reverse": null, "reverse_column": null, "type": "timestamptz"}], "cutover": {"mode": "rename", "retired_name": "orders_old"}, "indexes": [{"columns": ["customer_id"], "definition": null, "name": null, "unique": false, "where": null}, {"columns": ["status"], "definition": null, "name": null, "unique": false, "where": "status <> ''void''"}], "key": ["id"], "name": "orders_v2", "source": "public.orders", "target": "public.orders_v2", "versions": null, "views": []}'::jsonb,  E'{"blue": {"name": "orders", "schema": "public"}, "blue_columns": ["id", "customer_id", "amount", "state", "note", "created_at"], "blue_generated": [], "blue_identity_always": [], "blue_key": ["id"], "blue_key_collations": [null], "blue_key_types": ["bigint"], "blue_owner": "postgres", "bulk": true, "checks": [{"expression": "total_amount >= 0", "name": "orders_total_amount_nonneg"}], "columns": [{"blue_sequence": "public.orders_id_seq", "default": "nextval(''\\"public\\".\\"orders_v2_id_seq\\"''::regclass)", "default_inherited": true, "generated": null, "identity": "", "name": "id", "not_null": true, "reverse_column": "id", "reverse_expr": "\\"id\\"", "reverse_origin": "column", "sequence": "orders_v2_id_seq", "shared_sequence": null, "source_expr": "\\"id\\"", "type": "bigint"}, {"blue_sequence": null, "default": null, "default_inherited": false, "generated": null, "identity": "", "name": "customer_id", "not_null": true, "reverse_column": "customer_id", "reverse_expr": "\\"customer_id\\"", "reverse_origin": "column", "sequence": null, "shared_sequence": null, "source_expr": "\\"customer_id\\"", "type": "bigint"}, {"blue_sequence": null, "default": null, "default_inherited": false, "generated": null, "identity": "", "name": "total_amount", "not_null": true, "reverse_column": "amount", "reverse_expr": "round(total_amount)::integer", "reverse_origin": "explicit", "sequence": null, "shared_sequence": null, "source_expr": "amount::numeric(12,2)", "type": "numeric(12,2)"}, {"blue_sequence": null, "default": "''new''", "default_inherited": false, "generated": null, "identity": "", "name": "status", "not_null": true, "reverse_column": "state", "reverse_expr": "\\"status\\"", "reverse_origin": "column", "sequence": null, "shared_sequence": null, "source_expr": "state", "type": "text"}, {"blue_sequence": null, "default": null, "default_inherited": false, "generated": null, "identity": "", "name": "note", "not_null": false, "reverse_column": "note", "reverse_expr": "\\"note\\"", "reverse_origin": "column", "sequence": null, "shared_sequence": null, "source_expr": "\\"note\\"", "type": "text"}, {"blue_sequence": null, "default": "now()", "default_inherited": false, "generated": null, "identity": "", "name": "created_at", "not_null": true, "reverse_column": "created_at", "reverse_expr": "\\"created_at\\"", "reverse_origin": "column", "sequence": null, "shared_sequence": null, "source_expr": "\\"created_at\\"", "type": "timestamptz"}], "feeds": [{"blue_column": "id", "how": "copied back", "source": "id"}, {"blue_column": "customer_id", "how": "copied back", "source": "customer_id"}, {"blue_column": "amount", "how": "reverse", "source": "round(total_amount)::integer"}, {"blue_column": "state", "how": "copied back", "source": "status"}, {"blue_column": "note", "how": "copied back", "source": "note"}, {"blue_column": "created_at", "how": "copied back", "source": "created_at"}], "forward_function": {"name": "orders_v2_forward", "schema": "bgsync"}, "grants": [], "green": {"name": "orders_v2", "schema": "public"}, "green_key": ["id"], "indexes": [{"columns": ["customer_id"], "definition": null, "name": "orders_v2_customer_id_idx", "unique": false, "where": null}, {"columns": ["status"], "definition": null, "name": "orders_v2_status_idx", "unique": false, "where": "status <> ''void''"}], "name": "orders_v2", "plan_hash": "71c1a68d96fb6123", "primary_key_name": "orders_v2_pkey", "retired": {"name": "orders_old", "schema": "public"}, "search_path": ["pg_catalog", "public", "pg_temp"], "settings": {}, "state_schema": "bgsync", "triggers": {"del": "bgsync_orders_v2_fwd_del", "ins": "bgsync_orders_v2_fwd_ins", "trunc": "bgsync_orders_v2_fwd_trunc", "upd": "bgsync_orders_v2_fwd_upd"}, "versions": {}, "views": []}'::jsonb, '# A type change with a rename: integer `amount` becomes numeric `total_amount`,
# `state` becomes `status`; the reverse expressions keep blue fed after cutover.
name: orders_v2
source: public.orders
target: public.orders_v2
key: [id]
columns:
  - {name: id, type: bigint, not_null: true}
  - {name: customer_id, type: bigint, not_null: true}
  - name: total_amount
    type: numeric(12,2)
    not_null: true
    from: "amount::numeric(12,2)"
    reverse: "round(total_amount)::integer"
    reverse_column: amount
  - {name: status, type: text, not_null: true, from: state, default: "''new''"}
  - {name: note, type: text}
  - {name: created_at, type: timestamptz, not_null: true, default: "now()"}
indexes:
  - {columns: [customer_id]}
  - {columns: [status], where: "status <> ''void''"}
checks:
  - {name: orders_total_amount_nonneg, expression: "total_amount >= 0"}
backfill: {workers: 4, batch_rows: 10000, max_rows_per_second: 0}
verify: {workers: 4}
cutover: {mode: rename, retired_name: orders_old, lock_timeout: 2s, attempts: 10}
')
ON CONFLICT (name) DO UPDATE
   SET phase = 'prepared', plan_hash = EXCLUDED.plan_hash, plan = EXCLUDED.plan, spec = EXCLUDED.spec,
       plan_source = EXCLUDED.plan_source, source = EXCLUDED.source, target = EXCLUDED.target, updated_at = now()
 WHERE "bgsync"."migrations".phase IN ('rolled_back', 'finalized')
RETURNING name;
COMMIT;

-- phase: backfill
-- settings of each worker's session
-- batch progress commits with its rows, so a crash can only lose work that is redone on resume
SET synchronous_commit = off;
-- a batch waits at most this long for a row lock held by the application, then retries
SET lock_timeout = '10s';
-- probe green by key for each row (green's statistics are stale while it fills)
SET enable_hashjoin = off;
-- probe green by key for each row
SET enable_mergejoin = off;
-- pin this session's search_path, as in bgsync's trigger functions
SELECT set_config('search_path', '"pg_catalog", "public", "pg_temp"', false);

-- backfill orders_v2: plan about 4 partitions (4 workers, 10000 rows per batch)
BEGIN;
-- sampled key boundaries of blue: partitions cut at the sample's quantiles hold about as many rows each, whatever the key's spread
SELECT "id"::text
  FROM "public"."orders"
 ORDER BY "orders"."id";
-- record the backfill partitions (lo exclusive, hi inclusive, NULL unbounded)
-- parameters: $1 = <partitions as JSON>
INSERT INTO "bgsync"."chunks" (migration, chunk_no, lo, hi, step)
SELECT 'orders_v2', c.chunk_no, c.lo, c.hi, c.step
  FROM jsonb_to_recordset($1::jsonb) AS c(chunk_no integer, lo text[], hi text[], step numeric)
ON CONFLICT DO NOTHING;
-- record phase backfilling
UPDATE "bgsync"."migrations" SET phase = 'backfilling', updated_at = now()
 WHERE name = 'orders_v2';
COMMIT;

-- this process registers, then every 0.25 s heartbeats and reads the pause flag (while paused, or while a hold below applies, no worker starts a batch)
-- register this backfill process (its heartbeat tells `status` it is running)
-- parameters: $1 = <host and pid>
INSERT INTO "bgsync"."runs" (migration, command, client)
VALUES ('orders_v2', 'backfill', $1)
RETURNING id;
-- heartbeat of this backfill process, with what holds it; returns whether the migration is paused
-- parameters: $1 = <what holds it>, $2 = <seconds held>, $3 = <rows copied>, $4 = <run>
UPDATE "bgsync"."runs"
   SET heartbeat_at = clock_timestamp(), held = $1, held_seconds = $2, rows_copied = $3
 WHERE id = $4
RETURNING (SELECT m.paused_at IS NOT NULL FROM "bgsync"."migrations" AS m
            WHERE m.name = 'orders_v2');

-- with --max-replica-lag, every 0.25 s: hold while a standby lags more, or is gone, or its lag cannot be read
-- the primary's WAL position and each standby's replay position and lag (pg_stat_replication; without pg_read_all_stats the positions read NULL, and a lag that cannot be read holds the backfill)
SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), '0/0')::float8,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'name', coalesce(nullif(r.application_name, ''), 'walsender') || ' at '
                            || coalesce(host(r.client_addr), 'local socket'),
                    'state', r.state,
                    'replay', pg_catalog.pg_wal_lsn_diff(r.replay_lsn, '0/0')::float8,
                    'replay_lag', extract(epoch FROM r.replay_lag)::float8))
                   FROM pg_catalog.pg_stat_replication AS r), '[]'::jsonb);

-- with a rate limit (max_rows_per_second), before each batch: book it on the global timeline
BEGIN;
-- book the batch's rows on the migration's global rate timeline (shared by every worker of every process, committed at once); returns the seconds to wait before copying
-- parameters: $1 = <batch rows / max_rows_per_second>, $2 = <batch rows / max_rows_per_second>, $3 = <batch rows / max_rows_per_second>
INSERT INTO "bgsync"."rate_limits" AS r (migration, booked_until)
VALUES ('orders_v2', clock_timestamp() + make_interval(secs => $1))
ON CONFLICT (migration) DO UPDATE
   SET booked_until = greatest(clock_timestamp(), r.booked_until) + make_interval(secs => $2)
RETURNING greatest(0, extract(epoch FROM r.booked_until - clock_timestamp()) - $3)::float8;
COMMIT;

-- each batch, repeated by every worker until no partition is left
BEGIN;
-- claim a partition no other worker holds; the row lock lasts for this batch's transaction
SELECT chunk_no, lo, hi, cursor, step
  FROM "bgsync"."chunks"
 WHERE migration = 'orders_v2' AND NOT done
 ORDER BY chunk_no
 LIMIT 1
   FOR UPDATE SKIP LOCKED;
-- upper key of the next batch: the key that many rows on from the cursor (OFFSET: the batch size less one), in key order (the size adapts to backfill.batch_time)
-- parameters: $1 = <cursor>, $2 = <partition hi>, $3 = <batch rows - 1>
SELECT "id"::text
  FROM "public"."orders"
 WHERE ("id") > ($1::bigint) AND ("id") <= ($2::bigint)
 ORDER BY "orders"."id"
OFFSET $3 LIMIT 1;
-- copy one batch into green (bulk mode: no index yet, and every key a writer changes meanwhile is recorded and re-read from blue before the switch, so no row lock is needed)
-- parameters: $1 = <batch lower (exclusive)>, $2 = <batch upper (inclusive)>
INSERT INTO "public"."orders_v2" ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
SELECT "id", "customer_id", amount::numeric(12,2), state, "note", "created_at"
  FROM "public"."orders"
 WHERE ("orders"."id") > ($1::bigint) AND ("orders"."id") <= ($2::bigint);
-- record the batch, in the same transaction as its rows
-- parameters: $1 = <batch upper>, $2 = <partition done>, $3 = <rows inserted>, $4 = <partition done>, $5 = <partition>
UPDATE "bgsync"."chunks"
   SET cursor = $1, done = $2, rows_copied = rows_copied + $3, batches = batches + 1,
       started_at = coalesce(started_at, clock_timestamp()),
       finished_at = CASE WHEN $4 THEN clock_timestamp() END
 WHERE migration = 'orders_v2' AND chunk_no = $5;
-- is the migration paused (`bgsync pause`)? Read last in each batch's transaction: a paused batch rolls back
SELECT paused_at IS NOT NULL FROM "bgsync"."migrations" WHERE name = 'orders_v2';
COMMIT;

-- backfill orders_v2: one index build per connection, in parallel (plain, no writer waits)
-- pin this session's search_path, as in bgsync's trigger functions
SELECT set_config('search_path', '"pg_catalog", "public", "pg_temp"', false);
-- the session sorts with more memory for the index builds
SELECT set_config('maintenance_work_mem', '256MB', false);
-- primary key index of green "public"."orders_v2", built after the copy
CREATE UNIQUE INDEX IF NOT EXISTS "orders_v2_pkey" ON "public"."orders_v2" ("id");

-- backfill orders_v2: one index build per connection, in parallel (plain, no writer waits)
-- pin this session's search_path, as in bgsync's trigger functions
SELECT set_config('search_path', '"pg_catalog", "public", "pg_temp"', false);
-- the session sorts with more memory for the index builds
SELECT set_config('maintenance_work_mem', '256MB', false);
-- index orders_v2_customer_id_idx, built after the copy
CREATE INDEX IF NOT EXISTS "orders_v2_customer_id_idx"
    ON "public"."orders_v2" ("customer_id");

-- backfill orders_v2: one index build per connection, in parallel (plain, no writer waits)
-- pin this session's search_path, as in bgsync's trigger functions
SELECT set_config('search_path', '"pg_catalog", "public", "pg_temp"', false);
-- the session sorts with more memory for the index builds
SELECT set_config('maintenance_work_mem', '256MB', false);
-- index orders_v2_status_idx, built after the copy
CREATE INDEX IF NOT EXISTS "orders_v2_status_idx"
    ON "public"."orders_v2" ("status") WHERE (status <> 'void');

-- backfill orders_v2: green's primary key
BEGIN;
SET LOCAL lock_timeout = '2s';
-- the unique index becomes green's primary key
ALTER TABLE "public"."orders_v2" ADD CONSTRAINT "orders_v2_pkey" PRIMARY KEY USING INDEX "orders_v2_pkey";
COMMIT;

-- backfill orders_v2: drain rounds, repeated while a round finds 2,000 keys or more (at most 100)
-- drain commits with synchronous_commit off: a crash can only lose a round, whose keys stay in the log
SET synchronous_commit = off;
-- a round waits at most this long for a lock, then retries
SET lock_timeout = '10s';
-- pin this session's search_path, as in bgsync's trigger functions
SELECT set_config('search_path', '"pg_catalog", "public", "pg_temp"', false);
-- re-read up to 50000 keys of the change log from blue
WITH taken AS (
    DELETE FROM "bgsync"."orders_v2_log"
     WHERE ctid = ANY (ARRAY(SELECT ctid FROM "bgsync"."orders_v2_log" LIMIT 50000))
 RETURNING "id"
), changed AS (
    SELECT DISTINCT "id" FROM taken
), fresh AS (
    SELECT "id" AS "id", "customer_id" AS "customer_id", amount::numeric(12,2) AS "total_amount", state AS "status", "note" AS "note", "created_at" AS "created_at"
      FROM "public"."orders"
     WHERE ("orders"."id") IN (SELECT "id" FROM changed)
), gone AS (
    DELETE FROM "public"."orders_v2" AS g
     USING changed AS c
     WHERE (g."id") = (c."id")
       AND NOT EXISTS (SELECT FROM fresh AS r WHERE (r."id") = (g."id"))
), written AS (
    INSERT INTO "public"."orders_v2" AS t ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
    SELECT * FROM fresh
    ON CONFLICT ("id") DO UPDATE
       SET "customer_id" = EXCLUDED."customer_id", "total_amount" = EXCLUDED."total_amount", "status" = EXCLUDED."status", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at"
    RETURNING 1
)
SELECT (SELECT count(*) FROM taken) AS keys_taken, (SELECT count(*) FROM written) AS rows_written;

-- backfill orders_v2: switch the forward sync from the change log to dual write (blue's writers held off for the last keys)
BEGIN;
SET LOCAL lock_timeout = '2s';
-- give way in a deadlock: lower this transaction's deadlock_timeout to 100ms where the role may
DO $bgsync$
BEGIN
    PERFORM set_config('deadlock_timeout', '100ms', true);
EXCEPTION WHEN insufficient_privilege THEN
    NULL;
END
$bgsync$;
-- take the table locks ("public"."orders", SHARE ROW EXCLUSIVE) together: NOWAIT, retried every 2 ms for half of lock_timeout (2s), then waiting in the queue for the rest (bounded below deadlock_timeout)
DO $bgsync$
DECLARE
    timeout interval := '2s'::interval;
    started timestamptz := clock_timestamp();
    server_deadlock interval := (SELECT (reset_val || unit)::interval FROM pg_settings WHERE name = 'deadlock_timeout');
    wait interval;
BEGIN
    LOOP
        BEGIN
            LOCK TABLE "public"."orders" IN SHARE ROW EXCLUSIVE MODE NOWAIT;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            EXIT WHEN clock_timestamp() - started >= timeout / 2;
        END;
        PERFORM pg_sleep(0.002);
    END LOOP;
    wait := greatest(timeout - (clock_timestamp() - started), interval '1 millisecond');
    IF current_setting('deadlock_timeout')::interval >= server_deadlock THEN
        wait := least(wait, server_deadlock / 2);
    END IF;
    PERFORM set_config('lock_timeout', (ceil(extract(epoch FROM wait) * 1000))::int::text || 'ms', true);
    LOCK TABLE "public"."orders" IN SHARE ROW EXCLUSIVE MODE;
END
$bgsync$;
-- later lock waits: lock_timeout where deadlock_timeout could be lowered, else a tenth of deadlock_timeout at most
SELECT set_config('lock_timeout',
                  (ceil(extract(epoch FROM CASE WHEN lowered THEN t ELSE least(t, dt / 10) END) * 1000))::int::text
                  || 'ms', true)
  FROM (SELECT '2s'::interval AS t, (s.reset_val || s.unit)::interval AS dt,
               current_setting('deadlock_timeout')::interval < (s.reset_val || s.unit)::interval AS lowered
          FROM pg_settings s WHERE s.name = 'deadlock_timeout') AS d;
-- apply every key left in the change log (under the lock: no writer adds more)
WITH taken AS (
    DELETE FROM "bgsync"."orders_v2_log"
 RETURNING "id"
), changed AS (
    SELECT DISTINCT "id" FROM taken
), fresh AS (
    SELECT "id" AS "id", "customer_id" AS "customer_id", amount::numeric(12,2) AS "total_amount", state AS "status", "note" AS "note", "created_at" AS "created_at"
      FROM "public"."orders"
     WHERE ("orders"."id") IN (SELECT "id" FROM changed)
), gone AS (
    DELETE FROM "public"."orders_v2" AS g
     USING changed AS c
     WHERE (g."id") = (c."id")
       AND NOT EXISTS (SELECT FROM fresh AS r WHERE (r."id") = (g."id"))
), written AS (
    INSERT INTO "public"."orders_v2" AS t ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
    SELECT * FROM fresh
    ON CONFLICT ("id") DO UPDATE
       SET "customer_id" = EXCLUDED."customer_id", "total_amount" = EXCLUDED."total_amount", "status" = EXCLUDED."status", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at"
    RETURNING 1
)
SELECT (SELECT count(*) FROM taken) AS keys_taken, (SELECT count(*) FROM written) AS rows_written;
-- forward sync function: mirrors each statement on "public"."orders" into "public"."orders_v2", in the same transaction
CREATE OR REPLACE FUNCTION "bgsync"."orders_v2_forward"() RETURNS trigger
LANGUAGE plpgsql
SET search_path = "pg_catalog", "public", "pg_temp"
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_seqscan = off
SET jit = off
AS $bgsync$
DECLARE
    rewritten boolean;      -- UPDATE: the source's rows may differ from the ones the statement wrote
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO "public"."orders_v2" AS t ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
        SELECT s.* FROM bgsync_new_rows AS n,
               LATERAL (SELECT "id" AS "id", "customer_id" AS "customer_id", amount::numeric(12,2) AS "total_amount", state AS "status", "note" AS "note", "created_at" AS "created_at"
          FROM "public"."orders"
                 WHERE ("orders"."id") = (n."id")
                   AND pg_catalog.age("orders".xmin) <= 0) AS s
        ON CONFLICT ("id") DO UPDATE
           SET "customer_id" = EXCLUDED."customer_id", "total_amount" = EXCLUDED."total_amount", "status" = EXCLUDED."status", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
    ELSIF TG_OP = 'UPDATE' THEN
        -- rows whose key changed leave their old key behind in the target, unless the source holds it again;
        -- the same statement tells whether the rows may have changed since the statement wrote them (if not,
        -- the transition table is written as it is: re-reading the source by key was about a quarter of the
        -- sync's cost on a bulk UPDATE)
        WITH left_behind AS (
            DELETE FROM "public"."orders_v2" AS t
             USING (SELECT o."id" FROM bgsync_old_rows AS o
                 WHERE NOT EXISTS (SELECT FROM "public"."orders" AS s
                            WHERE (s."id") = (o."id")
                              AND pg_catalog.age(s.xmin) <= 0) OFFSET 0) AS o
             WHERE (t."id") = (o."id")
            RETURNING 1
        )
        SELECT pg_catalog.current_setting('transaction_isolation') IN ('repeatable read', 'serializable')
               OR EXISTS (SELECT FROM pg_catalog.pg_trigger
                           WHERE tgrelid = '"public"."orders"'::regclass AND tgenabled <> 'D'
                             AND tgname NOT IN ('bgsync_orders_v2_fwd_ins', 'bgsync_orders_v2_fwd_upd', 'bgsync_orders_v2_fwd_del', 'bgsync_orders_v2_fwd_trunc')
                             AND tgfoid NOT IN ('"pg_catalog"."RI_FKey_check_ins"'::regproc,
                                                '"pg_catalog"."RI_FKey_check_upd"'::regproc,
                                                '"pg_catalog"."RI_FKey_noaction_del"'::regproc,
                                                '"pg_catalog"."RI_FKey_noaction_upd"'::regproc,
                                                '"pg_catalog"."RI_FKey_restrict_del"'::regproc,
                                                '"pg_catalog"."RI_FKey_restrict_upd"'::regproc,
                                                '"pg_catalog"."unique_key_recheck"'::regproc))
          INTO rewritten;
        IF rewritten THEN
            INSERT INTO "public"."orders_v2" AS t ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
            SELECT s.* FROM bgsync_new_rows AS n,
                   LATERAL (SELECT "id" AS "id", "customer_id" AS "customer_id", amount::numeric(12,2) AS "total_amount", state AS "status", "note" AS "note", "created_at" AS "created_at"
              FROM "public"."orders"
                     WHERE ("orders"."id") = (n."id")
                       AND pg_catalog.age("orders".xmin) <= 0) AS s
            ON CONFLICT ("id") DO UPDATE
               SET "customer_id" = EXCLUDED."customer_id", "total_amount" = EXCLUDED."total_amount", "status" = EXCLUDED."status", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
        ELSE
            INSERT INTO "public"."orders_v2" AS t ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
            SELECT s.* FROM (SELECT "id" AS "id", "customer_id" AS "customer_id", amount::numeric(12,2) AS "total_amount", state AS "status", "note" AS "note", "created_at" AS "created_at"
              FROM bgsync_new_rows) AS s
            ON CONFLICT ("id") DO UPDATE
               SET "customer_id" = EXCLUDED."customer_id", "total_amount" = EXCLUDED."total_amount", "status" = EXCLUDED."status", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM "public"."orders_v2" AS t
         USING (SELECT o."id" FROM bgsync_old_rows AS o
                 WHERE NOT EXISTS (SELECT FROM "public"."orders" AS s
                            WHERE (s."id") = (o."id")
                              AND pg_catalog.age(s.xmin) <= 0) OFFSET 0) AS o
         WHERE (t."id") = (o."id");
    ELSIF TG_OP = 'TRUNCATE' THEN
        TRUNCATE "public"."orders_v2";
    END IF;
    RETURN NULL;
END
$bgsync$;
-- drop the change log: nothing records into it any more
DROP TABLE "bgsync"."orders_v2_log";
COMMIT;

-- backfill orders_v2 complete
BEGIN;
-- record phase backfilled
UPDATE "bgsync"."migrations" SET phase = 'backfilled', updated_at = now()
 WHERE name = 'orders_v2';
-- record when bgsync last wrote green itself (verify waits for every snapshot older than this)
UPDATE "bgsync"."migrations" SET green_written_at = clock_timestamp()
 WHERE name = 'orders_v2';
COMMIT;

-- phase: verify
-- each verify worker's session
BEGIN;
-- verify's parallelism is its own workers, one core each: no parallel workers per query on top
SET max_parallel_workers_per_gather = 0;
-- no JIT compilation: each piece is one scan, compiled anew per query for more than it saves
SET jit = off;
-- pin this session's search_path, as in bgsync's trigger functions
SELECT set_config('search_path', '"pg_catalog", "public", "pg_temp"', false);
COMMIT;

-- each partition piece by piece: the next piece's upper key (the piece size adapts to a third of verify.max_snapshot_age)
BEGIN;
-- upper key of the next batch: the key that many rows on from the cursor (OFFSET: the batch size less one), in key order (the size adapts to backfill.batch_time)
-- parameters: $1 = <piece lower>, $2 = <partition hi>, $3 = <piece rows - 1>
SELECT "id"::text
  FROM "public"."orders"
 WHERE ("id") > ($1::bigint) AND ("id") <= ($2::bigint)
 ORDER BY "orders"."id"
OFFSET $3 LIMIT 1;
COMMIT;

-- each piece, in one REPEATABLE READ READ ONLY transaction whose statements run under a statement_timeout that ends it before verify.max_snapshot_age (then the piece is split)
BEGIN;
-- count and order-independent checksum of blue rows, projected through the plan's `from` expressions as green's types
-- parameters: $1 = <piece lower (exclusive)>, $2 = <piece upper (inclusive)>
SELECT count(*), coalesce(sum(hashint8extended(hash_record_extended(ROW(CAST(("id") AS bigint), CAST(("customer_id") AS bigint), hashtextextended((CAST((amount::numeric(12,2)) AS numeric(12,2)))::text COLLATE "C", 0), CAST((state) AS text), CAST(("note") AS text), CAST(("created_at") AS timestamptz)), 0), 7)), 0)
  FROM "public"."orders"
 WHERE ("id") > ($1::bigint) AND ("id") <= ($2::bigint);
-- count and order-independent checksum of green rows
-- parameters: $1 = <piece lower (exclusive)>, $2 = <piece upper (inclusive)>
SELECT count(*), coalesce(sum(hashint8extended(hash_record_extended(ROW("id", "customer_id", hashtextextended(("total_amount")::text COLLATE "C", 0), "status", "note", "created_at"), 0), 7)), 0)
  FROM "public"."orders_v2"
 WHERE ("id") > ($1::bigint) AND ("id") <= ($2::bigint);
COMMIT;

-- a mismatched range: bisect, then compare its rows (same transaction)
BEGIN;
-- the middle key of a mismatched blue range, to bisect it
-- parameters: $1 = <piece lower (exclusive)>, $2 = <piece upper (inclusive)>, $3 = <half the rows>
SELECT "id"::text
  FROM "public"."orders"
 WHERE ("id") > ($1::bigint) AND ("id") <= ($2::bigint)
 ORDER BY "orders"."id"
OFFSET $3 LIMIT 1;
-- the rows of a narrowed blue range, key and projected columns as text
-- parameters: $1 = <piece lower (exclusive)>, $2 = <piece upper (inclusive)>
SELECT ARRAY["id"::text],
       ARRAY[(CAST(("id") AS bigint))::text, (CAST(("customer_id") AS bigint))::text, (CAST((amount::numeric(12,2)) AS numeric(12,2)))::text, (CAST((state) AS text))::text, (CAST(("note") AS text))::text, (CAST(("created_at") AS timestamptz))::text]
  FROM "public"."orders"
 WHERE ("id") > ($1::bigint) AND ("id") <= ($2::bigint);
-- the rows of a narrowed green range, key and columns as text
-- parameters: $1 = <piece lower (exclusive)>, $2 = <piece upper (inclusive)>
SELECT ARRAY["id"::text],
       ARRAY[("id")::text, ("customer_id")::text, ("total_amount")::text, ("status")::text, ("note")::text, ("created_at")::text]
  FROM "public"."orders_v2"
 WHERE ("id") > ($1::bigint) AND ("id") <= ($2::bigint);
COMMIT;

-- phase: expose
-- expose orders_v2: the plan has no `versions`, so there is no window for two releases

-- phase: cutover
-- cutover orders_v2: not prepared yet; this is the SQL cutover runs after prepare, backfill and a passing verify (green's shape comes from the plan)

-- cutover orders_v2: green analyzed and materialized views copied over green before the lock
-- analyze green "public"."orders_v2" before it goes live (SHARE UPDATE EXCLUSIVE: writers keep going)
ANALYZE "public"."orders_v2";

-- cutover orders_v2: public.orders becomes green (rename mode)
BEGIN;
SET LOCAL lock_timeout = '2s';
-- give way in a deadlock: lower this transaction's deadlock_timeout to 100ms where the role may
DO $bgsync$
BEGIN
    PERFORM set_config('deadlock_timeout', '100ms', true);
EXCEPTION WHEN insufficient_privilege THEN
    NULL;
END
$bgsync$;
-- take the table locks ("public"."orders", "public"."orders_v2") together: NOWAIT, retried every 2 ms for half of lock_timeout (2s), then waiting in the queue for the rest (bounded below deadlock_timeout)
DO $bgsync$
DECLARE
    timeout interval := '2s'::interval;
    started timestamptz := clock_timestamp();
    server_deadlock interval := (SELECT (reset_val || unit)::interval FROM pg_settings WHERE name = 'deadlock_timeout');
    wait interval;
BEGIN
    LOOP
        BEGIN
            LOCK TABLE "public"."orders", "public"."orders_v2" IN ACCESS EXCLUSIVE MODE NOWAIT;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            EXIT WHEN clock_timestamp() - started >= timeout / 2;
        END;
        PERFORM pg_sleep(0.002);
    END LOOP;
    wait := greatest(timeout - (clock_timestamp() - started), interval '1 millisecond');
    IF current_setting('deadlock_timeout')::interval >= server_deadlock THEN
        wait := least(wait, server_deadlock / 2);
    END IF;
    PERFORM set_config('lock_timeout', (ceil(extract(epoch FROM wait) * 1000))::int::text || 'ms', true);
    LOCK TABLE "public"."orders", "public"."orders_v2" IN ACCESS EXCLUSIVE MODE;
END
$bgsync$;
-- later lock waits: lock_timeout where deadlock_timeout could be lowered, else a tenth of deadlock_timeout at most
SELECT set_config('lock_timeout',
                  (ceil(extract(epoch FROM CASE WHEN lowered THEN t ELSE least(t, dt / 10) END) * 1000))::int::text
                  || 'ms', true)
  FROM (SELECT '2s'::interval AS t, (s.reset_val || s.unit)::interval AS dt,
               current_setting('deadlock_timeout')::interval < (s.reset_val || s.unit)::interval AS lowered
          FROM pg_settings s WHERE s.name = 'deadlock_timeout') AS d;
-- drop the forward sync ins trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_fwd_ins" ON "public"."orders";
-- drop the forward sync upd trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_fwd_upd" ON "public"."orders";
-- drop the forward sync del trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_fwd_del" ON "public"."orders";
-- drop the forward sync trunc trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_fwd_trunc" ON "public"."orders";
-- orders_v2_id_seq continues after orders_id_seq (and after every id in orders_v2), so ids never collide
-- value read at run time: the sequence names (blue's from the catalog; green's from the plan, or as PostgreSQL named an identity column's)
SELECT setval('"public"."orders_v2_id_seq"'::regclass,
              greatest(nextval('"public"."orders_id_seq"'::regclass),
                       (SELECT coalesce(max("id") + 1, 1) FROM "public"."orders_v2")),
              false);
-- rename sequence orders_id_seq to orders_old_id_seq
-- value read at run time: the sequence names (from the catalog)
ALTER SEQUENCE "public"."orders_id_seq" RENAME TO "orders_old_id_seq";
-- rename sequence orders_v2_id_seq to orders_id_seq
-- value read at run time: the sequence names (from the catalog)
ALTER SEQUENCE "public"."orders_v2_id_seq" RENAME TO "orders_id_seq";
-- rename index orders_customer_id_idx to orders_old_customer_id_idx
-- value read at run time: the index names (from the catalog)
ALTER INDEX "public"."orders_customer_id_idx" RENAME TO "orders_old_customer_id_idx";
-- rename constraint orders_pkey to orders_old_pkey
-- value read at run time: the constraint names (from the catalog)
ALTER TABLE "public"."orders" RENAME CONSTRAINT "orders_pkey" TO "orders_old_pkey";
-- rename table orders to orders_old
ALTER TABLE "public"."orders" RENAME TO "orders_old";
-- rename table orders_v2 to orders
ALTER TABLE "public"."orders_v2" RENAME TO "orders";
-- rename constraint orders_v2_pkey to orders_pkey
-- value read at run time: the constraint names (from the catalog)
ALTER TABLE "public"."orders" RENAME CONSTRAINT "orders_v2_pkey" TO "orders_pkey";
-- rename index orders_v2_customer_id_idx to orders_customer_id_idx
-- value read at run time: the index names (from the catalog)
ALTER INDEX "public"."orders_v2_customer_id_idx" RENAME TO "orders_customer_id_idx";
-- reverse sync function: mirrors each statement on "public"."orders" into "public"."orders_old", in the same transaction
CREATE OR REPLACE FUNCTION "bgsync"."orders_v2_reverse"() RETURNS trigger
LANGUAGE plpgsql
SET search_path = "pg_catalog", "public", "pg_temp"
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_seqscan = off
SET jit = off
AS $bgsync$
DECLARE
    rewritten boolean;      -- UPDATE: the source's rows may differ from the ones the statement wrote
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO "public"."orders_old" AS t ("id", "customer_id", "amount", "state", "note", "created_at") OVERRIDING SYSTEM VALUE
        SELECT s.* FROM bgsync_new_rows AS n,
               LATERAL (SELECT "id" AS "id", "customer_id" AS "customer_id", round(total_amount)::integer AS "amount", "status" AS "state", "note" AS "note", "created_at" AS "created_at"
          FROM "public"."orders"
                 WHERE ("orders"."id") = (n."id")
                   AND pg_catalog.age("orders".xmin) <= 0) AS s
        ON CONFLICT ("id") DO UPDATE
           SET "customer_id" = EXCLUDED."customer_id", "amount" = EXCLUDED."amount", "state" = EXCLUDED."state", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
    ELSIF TG_OP = 'UPDATE' THEN
        -- rows whose key changed leave their old key behind in the target, unless the source holds it again;
        -- the same statement tells whether the rows may have changed since the statement wrote them (if not,
        -- the transition table is written as it is: re-reading the source by key was about a quarter of the
        -- sync's cost on a bulk UPDATE)
        WITH left_behind AS (
            DELETE FROM "public"."orders_old" AS t
             USING (SELECT o."id" FROM bgsync_old_rows AS o
                 WHERE NOT EXISTS (SELECT FROM "public"."orders" AS s
                            WHERE (s."id") = (o."id")
                              AND pg_catalog.age(s.xmin) <= 0) OFFSET 0) AS o
             WHERE (t."id") = (o."id")
            RETURNING 1
        )
        SELECT pg_catalog.current_setting('transaction_isolation') IN ('repeatable read', 'serializable')
               OR EXISTS (SELECT FROM pg_catalog.pg_trigger
                           WHERE tgrelid = '"public"."orders"'::regclass AND tgenabled <> 'D'
                             AND tgname NOT IN ('bgsync_orders_v2_rev_ins', 'bgsync_orders_v2_rev_upd', 'bgsync_orders_v2_rev_del', 'bgsync_orders_v2_rev_trunc')
                             AND tgfoid NOT IN ('"pg_catalog"."RI_FKey_check_ins"'::regproc,
                                                '"pg_catalog"."RI_FKey_check_upd"'::regproc,
                                                '"pg_catalog"."RI_FKey_noaction_del"'::regproc,
                                                '"pg_catalog"."RI_FKey_noaction_upd"'::regproc,
                                                '"pg_catalog"."RI_FKey_restrict_del"'::regproc,
                                                '"pg_catalog"."RI_FKey_restrict_upd"'::regproc,
                                                '"pg_catalog"."unique_key_recheck"'::regproc))
          INTO rewritten;
        IF rewritten THEN
            INSERT INTO "public"."orders_old" AS t ("id", "customer_id", "amount", "state", "note", "created_at") OVERRIDING SYSTEM VALUE
            SELECT s.* FROM bgsync_new_rows AS n,
                   LATERAL (SELECT "id" AS "id", "customer_id" AS "customer_id", round(total_amount)::integer AS "amount", "status" AS "state", "note" AS "note", "created_at" AS "created_at"
              FROM "public"."orders"
                     WHERE ("orders"."id") = (n."id")
                       AND pg_catalog.age("orders".xmin) <= 0) AS s
            ON CONFLICT ("id") DO UPDATE
               SET "customer_id" = EXCLUDED."customer_id", "amount" = EXCLUDED."amount", "state" = EXCLUDED."state", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
        ELSE
            INSERT INTO "public"."orders_old" AS t ("id", "customer_id", "amount", "state", "note", "created_at") OVERRIDING SYSTEM VALUE
            SELECT s.* FROM (SELECT "id" AS "id", "customer_id" AS "customer_id", round(total_amount)::integer AS "amount", "status" AS "state", "note" AS "note", "created_at" AS "created_at"
              FROM bgsync_new_rows) AS s
            ON CONFLICT ("id") DO UPDATE
               SET "customer_id" = EXCLUDED."customer_id", "amount" = EXCLUDED."amount", "state" = EXCLUDED."state", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM "public"."orders_old" AS t
         USING (SELECT o."id" FROM bgsync_old_rows AS o
                 WHERE NOT EXISTS (SELECT FROM "public"."orders" AS s
                            WHERE (s."id") = (o."id")
                              AND pg_catalog.age(s.xmin) <= 0) OFFSET 0) AS o
         WHERE (t."id") = (o."id");
    ELSIF TG_OP = 'TRUNCATE' THEN
        TRUNCATE "public"."orders_old";
    END IF;
    RETURN NULL;
END
$bgsync$;
-- reverse sync trigger for INSERT
CREATE TRIGGER "bgsync_orders_v2_rev_ins" AFTER INSERT ON "public"."orders"
    REFERENCING NEW TABLE AS bgsync_new_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_reverse"();
-- reverse sync trigger for UPDATE (including key changes)
CREATE TRIGGER "bgsync_orders_v2_rev_upd" AFTER UPDATE ON "public"."orders"
    REFERENCING OLD TABLE AS bgsync_old_rows NEW TABLE AS bgsync_new_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_reverse"();
-- reverse sync trigger for DELETE
CREATE TRIGGER "bgsync_orders_v2_rev_del" AFTER DELETE ON "public"."orders"
    REFERENCING OLD TABLE AS bgsync_old_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_reverse"();
-- reverse sync trigger for TRUNCATE
CREATE TRIGGER "bgsync_orders_v2_rev_trunc" AFTER TRUNCATE ON "public"."orders"
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_reverse"();
-- keep the reverse sync ins trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_rev_ins";
-- keep the reverse sync upd trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_rev_upd";
-- keep the reverse sync del trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_rev_del";
-- keep the reverse sync trunc trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_rev_trunc";
-- record the cutover (what was renamed and moved, so rollback can undo exactly that)
-- value read at run time: the renames and objects above
UPDATE "bgsync"."migrations"
   SET phase = 'cut_over', cutover = '{"mode": "rename", "renames": [{"kind": "sequence", "schema": "public", "old": "orders_id_seq", "new": "orders_old_id_seq", "table": ""}, {"kind": "sequence", "schema": "public", "old": "orders_v2_id_seq", "new": "orders_id_seq", "table": ""}, {"kind": "index", "schema": "public", "old": "orders_customer_id_idx", "new": "orders_old_customer_id_idx", "table": "orders"}, {"kind": "constraint", "schema": "public", "old": "orders_pkey", "new": "orders_old_pkey", "table": "orders"}, {"kind": "table", "schema": "public", "old": "orders", "new": "orders_old", "table": ""}, {"kind": "table", "schema": "public", "old": "orders_v2", "new": "orders", "table": ""}, {"kind": "constraint", "schema": "public", "old": "orders_v2_pkey", "new": "orders_pkey", "table": "orders"}, {"kind": "index", "schema": "public", "old": "orders_v2_customer_id_idx", "new": "orders_customer_id_idx", "table": "orders"}], "surround": {"views": [], "functions": [], "triggers": [], "rls": {"enabled": false, "forced": false, "policies": []}, "publications": [], "matviews": []}, "window": false}'::jsonb, updated_at = now()
 WHERE name = 'orders_v2' AND phase = 'verified'
RETURNING name;
COMMIT;

-- phase: rollback
-- rollback orders_v2: migration is not prepared; this is what rollback runs after prepare, before cutover: it drops the forward triggers and green

-- rollback orders_v2: drop the forward triggers and green public.orders_v2
BEGIN;
SET LOCAL lock_timeout = '2s';
-- lock blue "public"."orders" briefly to drop the triggers
LOCK TABLE "public"."orders" IN SHARE ROW EXCLUSIVE MODE;
-- drop the forward sync ins trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_fwd_ins" ON "public"."orders";
-- drop the forward sync upd trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_fwd_upd" ON "public"."orders";
-- drop the forward sync del trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_fwd_del" ON "public"."orders";
-- drop the forward sync trunc trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_fwd_trunc" ON "public"."orders";
-- drop the forward sync function
DROP FUNCTION IF EXISTS "bgsync"."orders_v2_forward"();
-- drop green "public"."orders_v2" (its own sequences go with it)
DROP TABLE IF EXISTS "public"."orders_v2";
-- drop the change log of bulk mode (gone already once the sync switched to dual write)
DROP TABLE IF EXISTS "bgsync"."orders_v2_log";
-- forget the backfill partitions
DELETE FROM "bgsync"."chunks" WHERE migration = 'orders_v2';
-- record phase rolled_back
UPDATE "bgsync"."migrations" SET phase = 'rolled_back', updated_at = now()
 WHERE name = 'orders_v2';
COMMIT;

-- rollback orders_v2 after cutover (not cut over yet; this is the SQL it runs then): swaps blue back and resumes forward sync

-- rollback orders_v2: swap back to blue public.orders and resume forward sync
BEGIN;
SET LOCAL lock_timeout = '2s';
-- give way in a deadlock: lower this transaction's deadlock_timeout to 100ms where the role may
DO $bgsync$
BEGIN
    PERFORM set_config('deadlock_timeout', '100ms', true);
EXCEPTION WHEN insufficient_privilege THEN
    NULL;
END
$bgsync$;
-- take the table locks ("public"."orders", "public"."orders_old") together: NOWAIT, retried every 2 ms for half of lock_timeout (2s), then waiting in the queue for the rest (bounded below deadlock_timeout)
DO $bgsync$
DECLARE
    timeout interval := '2s'::interval;
    started timestamptz := clock_timestamp();
    server_deadlock interval := (SELECT (reset_val || unit)::interval FROM pg_settings WHERE name = 'deadlock_timeout');
    wait interval;
BEGIN
    LOOP
        BEGIN
            LOCK TABLE "public"."orders", "public"."orders_old" IN ACCESS EXCLUSIVE MODE NOWAIT;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            EXIT WHEN clock_timestamp() - started >= timeout / 2;
        END;
        PERFORM pg_sleep(0.002);
    END LOOP;
    wait := greatest(timeout - (clock_timestamp() - started), interval '1 millisecond');
    IF current_setting('deadlock_timeout')::interval >= server_deadlock THEN
        wait := least(wait, server_deadlock / 2);
    END IF;
    PERFORM set_config('lock_timeout', (ceil(extract(epoch FROM wait) * 1000))::int::text || 'ms', true);
    LOCK TABLE "public"."orders", "public"."orders_old" IN ACCESS EXCLUSIVE MODE;
END
$bgsync$;
-- later lock waits: lock_timeout where deadlock_timeout could be lowered, else a tenth of deadlock_timeout at most
SELECT set_config('lock_timeout',
                  (ceil(extract(epoch FROM CASE WHEN lowered THEN t ELSE least(t, dt / 10) END) * 1000))::int::text
                  || 'ms', true)
  FROM (SELECT '2s'::interval AS t, (s.reset_val || s.unit)::interval AS dt,
               current_setting('deadlock_timeout')::interval < (s.reset_val || s.unit)::interval AS lowered
          FROM pg_settings s WHERE s.name = 'deadlock_timeout') AS d;
-- drop the reverse sync ins trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_rev_ins" ON "public"."orders";
-- drop the reverse sync upd trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_rev_upd" ON "public"."orders";
-- drop the reverse sync del trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_rev_del" ON "public"."orders";
-- drop the reverse sync trunc trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_rev_trunc" ON "public"."orders";
-- orders_old_id_seq continues after orders_id_seq (and after every id in orders_old), so ids never collide
-- value read at run time: the sequence names (blue's from the catalog; green's from the plan, or as PostgreSQL named an identity column's)
SELECT setval('"public"."orders_old_id_seq"'::regclass,
              greatest(nextval('"public"."orders_id_seq"'::regclass),
                       (SELECT coalesce(max("id") + 1, 1) FROM "public"."orders_old")),
              false);
-- rename index orders_customer_id_idx to orders_v2_customer_id_idx
-- value read at run time: the index names (from the catalog)
ALTER INDEX "public"."orders_customer_id_idx" RENAME TO "orders_v2_customer_id_idx";
-- rename constraint orders_pkey to orders_v2_pkey
-- value read at run time: the constraint names (from the catalog)
ALTER TABLE "public"."orders" RENAME CONSTRAINT "orders_pkey" TO "orders_v2_pkey";
-- rename table orders to orders_v2
ALTER TABLE "public"."orders" RENAME TO "orders_v2";
-- rename table orders_old to orders
ALTER TABLE "public"."orders_old" RENAME TO "orders";
-- rename constraint orders_old_pkey to orders_pkey
-- value read at run time: the constraint names (from the catalog)
ALTER TABLE "public"."orders" RENAME CONSTRAINT "orders_old_pkey" TO "orders_pkey";
-- rename index orders_old_customer_id_idx to orders_customer_id_idx
-- value read at run time: the index names (from the catalog)
ALTER INDEX "public"."orders_old_customer_id_idx" RENAME TO "orders_customer_id_idx";
-- rename sequence orders_id_seq to orders_v2_id_seq
-- value read at run time: the sequence names (from the catalog)
ALTER SEQUENCE "public"."orders_id_seq" RENAME TO "orders_v2_id_seq";
-- rename sequence orders_old_id_seq to orders_id_seq
-- value read at run time: the sequence names (from the catalog)
ALTER SEQUENCE "public"."orders_old_id_seq" RENAME TO "orders_id_seq";
-- forward sync function: mirrors each statement on "public"."orders" into "public"."orders_v2", in the same transaction
CREATE OR REPLACE FUNCTION "bgsync"."orders_v2_forward"() RETURNS trigger
LANGUAGE plpgsql
SET search_path = "pg_catalog", "public", "pg_temp"
SET enable_hashjoin = off
SET enable_mergejoin = off
SET enable_seqscan = off
SET jit = off
AS $bgsync$
DECLARE
    rewritten boolean;      -- UPDATE: the source's rows may differ from the ones the statement wrote
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO "public"."orders_v2" AS t ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
        SELECT s.* FROM bgsync_new_rows AS n,
               LATERAL (SELECT "id" AS "id", "customer_id" AS "customer_id", amount::numeric(12,2) AS "total_amount", state AS "status", "note" AS "note", "created_at" AS "created_at"
          FROM "public"."orders"
                 WHERE ("orders"."id") = (n."id")
                   AND pg_catalog.age("orders".xmin) <= 0) AS s
        ON CONFLICT ("id") DO UPDATE
           SET "customer_id" = EXCLUDED."customer_id", "total_amount" = EXCLUDED."total_amount", "status" = EXCLUDED."status", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
    ELSIF TG_OP = 'UPDATE' THEN
        -- rows whose key changed leave their old key behind in the target, unless the source holds it again;
        -- the same statement tells whether the rows may have changed since the statement wrote them (if not,
        -- the transition table is written as it is: re-reading the source by key was about a quarter of the
        -- sync's cost on a bulk UPDATE)
        WITH left_behind AS (
            DELETE FROM "public"."orders_v2" AS t
             USING (SELECT o."id" FROM bgsync_old_rows AS o
                 WHERE NOT EXISTS (SELECT FROM "public"."orders" AS s
                            WHERE (s."id") = (o."id")
                              AND pg_catalog.age(s.xmin) <= 0) OFFSET 0) AS o
             WHERE (t."id") = (o."id")
            RETURNING 1
        )
        SELECT pg_catalog.current_setting('transaction_isolation') IN ('repeatable read', 'serializable')
               OR EXISTS (SELECT FROM pg_catalog.pg_trigger
                           WHERE tgrelid = '"public"."orders"'::regclass AND tgenabled <> 'D'
                             AND tgname NOT IN ('bgsync_orders_v2_fwd_ins', 'bgsync_orders_v2_fwd_upd', 'bgsync_orders_v2_fwd_del', 'bgsync_orders_v2_fwd_trunc')
                             AND tgfoid NOT IN ('"pg_catalog"."RI_FKey_check_ins"'::regproc,
                                                '"pg_catalog"."RI_FKey_check_upd"'::regproc,
                                                '"pg_catalog"."RI_FKey_noaction_del"'::regproc,
                                                '"pg_catalog"."RI_FKey_noaction_upd"'::regproc,
                                                '"pg_catalog"."RI_FKey_restrict_del"'::regproc,
                                                '"pg_catalog"."RI_FKey_restrict_upd"'::regproc,
                                                '"pg_catalog"."unique_key_recheck"'::regproc))
          INTO rewritten;
        IF rewritten THEN
            INSERT INTO "public"."orders_v2" AS t ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
            SELECT s.* FROM bgsync_new_rows AS n,
                   LATERAL (SELECT "id" AS "id", "customer_id" AS "customer_id", amount::numeric(12,2) AS "total_amount", state AS "status", "note" AS "note", "created_at" AS "created_at"
              FROM "public"."orders"
                     WHERE ("orders"."id") = (n."id")
                       AND pg_catalog.age("orders".xmin) <= 0) AS s
            ON CONFLICT ("id") DO UPDATE
               SET "customer_id" = EXCLUDED."customer_id", "total_amount" = EXCLUDED."total_amount", "status" = EXCLUDED."status", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
        ELSE
            INSERT INTO "public"."orders_v2" AS t ("id", "customer_id", "total_amount", "status", "note", "created_at") OVERRIDING SYSTEM VALUE
            SELECT s.* FROM (SELECT "id" AS "id", "customer_id" AS "customer_id", amount::numeric(12,2) AS "total_amount", state AS "status", "note" AS "note", "created_at" AS "created_at"
              FROM bgsync_new_rows) AS s
            ON CONFLICT ("id") DO UPDATE
               SET "customer_id" = EXCLUDED."customer_id", "total_amount" = EXCLUDED."total_amount", "status" = EXCLUDED."status", "note" = EXCLUDED."note", "created_at" = EXCLUDED."created_at";
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        DELETE FROM "public"."orders_v2" AS t
         USING (SELECT o."id" FROM bgsync_old_rows AS o
                 WHERE NOT EXISTS (SELECT FROM "public"."orders" AS s
                            WHERE (s."id") = (o."id")
                              AND pg_catalog.age(s.xmin) <= 0) OFFSET 0) AS o
         WHERE (t."id") = (o."id");
    ELSIF TG_OP = 'TRUNCATE' THEN
        TRUNCATE "public"."orders_v2";
    END IF;
    RETURN NULL;
END
$bgsync$;
-- forward sync trigger for INSERT
CREATE TRIGGER "bgsync_orders_v2_fwd_ins" AFTER INSERT ON "public"."orders"
    REFERENCING NEW TABLE AS bgsync_new_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_forward"();
-- forward sync trigger for UPDATE (including key changes)
CREATE TRIGGER "bgsync_orders_v2_fwd_upd" AFTER UPDATE ON "public"."orders"
    REFERENCING OLD TABLE AS bgsync_old_rows NEW TABLE AS bgsync_new_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_forward"();
-- forward sync trigger for DELETE
CREATE TRIGGER "bgsync_orders_v2_fwd_del" AFTER DELETE ON "public"."orders"
    REFERENCING OLD TABLE AS bgsync_old_rows
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_forward"();
-- forward sync trigger for TRUNCATE
CREATE TRIGGER "bgsync_orders_v2_fwd_trunc" AFTER TRUNCATE ON "public"."orders"
    FOR EACH STATEMENT
    -- not called for the statements either direction of the sync runs itself (the window of expose)
    WHEN (pg_catalog.current_setting('bgsync.mirror', true) IS DISTINCT FROM pg_catalog.pg_trigger_depth()::text)
    EXECUTE FUNCTION "bgsync"."orders_v2_forward"();
-- keep the forward sync ins trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_fwd_ins";
-- keep the forward sync upd trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_fwd_upd";
-- keep the forward sync del trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_fwd_del";
-- keep the forward sync trunc trigger firing under session_replication_role = replica
ALTER TABLE "public"."orders" ENABLE ALWAYS TRIGGER "bgsync_orders_v2_fwd_trunc";
-- record the rollback: blue is live again, green is kept in sync and must be verified before a new cutover
UPDATE "bgsync"."migrations"
   SET phase = 'reverted', cutover = NULL, updated_at = now()
 WHERE name = 'orders_v2' AND phase = 'cut_over'
RETURNING name;
COMMIT;

-- phase: finalize
-- finalize orders_v2: migration is not prepared; finalize runs after cutover, and this is the SQL it runs then

-- finalize orders_v2: the reverse sync leaves the live table public.orders
BEGIN;
SET LOCAL lock_timeout = '2s';
-- give way in a deadlock: lower this transaction's deadlock_timeout to 100ms where the role may
DO $bgsync$
BEGIN
    PERFORM set_config('deadlock_timeout', '100ms', true);
EXCEPTION WHEN insufficient_privilege THEN
    NULL;
END
$bgsync$;
-- take the table locks ("public"."orders") together: NOWAIT, retried every 2 ms for half of lock_timeout (2s), then waiting in the queue for the rest (bounded below deadlock_timeout)
DO $bgsync$
DECLARE
    timeout interval := '2s'::interval;
    started timestamptz := clock_timestamp();
    server_deadlock interval := (SELECT (reset_val || unit)::interval FROM pg_settings WHERE name = 'deadlock_timeout');
    wait interval;
BEGIN
    LOOP
        BEGIN
            LOCK TABLE "public"."orders" IN ACCESS EXCLUSIVE MODE NOWAIT;
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            EXIT WHEN clock_timestamp() - started >= timeout / 2;
        END;
        PERFORM pg_sleep(0.002);
    END LOOP;
    wait := greatest(timeout - (clock_timestamp() - started), interval '1 millisecond');
    IF current_setting('deadlock_timeout')::interval >= server_deadlock THEN
        wait := least(wait, server_deadlock / 2);
    END IF;
    PERFORM set_config('lock_timeout', (ceil(extract(epoch FROM wait) * 1000))::int::text || 'ms', true);
    LOCK TABLE "public"."orders" IN ACCESS EXCLUSIVE MODE;
END
$bgsync$;
-- later lock waits: lock_timeout where deadlock_timeout could be lowered, else a tenth of deadlock_timeout at most
SELECT set_config('lock_timeout',
                  (ceil(extract(epoch FROM CASE WHEN lowered THEN t ELSE least(t, dt / 10) END) * 1000))::int::text
                  || 'ms', true)
  FROM (SELECT '2s'::interval AS t, (s.reset_val || s.unit)::interval AS dt,
               current_setting('deadlock_timeout')::interval < (s.reset_val || s.unit)::interval AS lowered
          FROM pg_settings s WHERE s.name = 'deadlock_timeout') AS d;
-- drop the reverse sync ins trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_rev_ins" ON "public"."orders";
-- drop the reverse sync upd trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_rev_upd" ON "public"."orders";
-- drop the reverse sync del trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_rev_del" ON "public"."orders";
-- drop the reverse sync trunc trigger
DROP TRIGGER IF EXISTS "bgsync_orders_v2_rev_trunc" ON "public"."orders";
-- record phase finalizing: from here on there is no rollback (writes no longer reach the retired table)
UPDATE "bgsync"."migrations" SET phase = 'finalizing', updated_at = now()
 WHERE name = 'orders_v2' AND phase = 'cut_over'
RETURNING name;
COMMIT;

-- finalize orders_v2: drop the retired table public.orders_old
BEGIN;
SET LOCAL lock_timeout = '2s';
-- drop the retired table "public"."orders_old" (refused if anything still depends on it)
DROP TABLE "public"."orders_old";
-- drop the reverse sync function
DROP FUNCTION IF EXISTS "bgsync"."orders_v2_reverse"();
-- drop the forward sync function
DROP FUNCTION IF EXISTS "bgsync"."orders_v2_forward"();
-- record phase finalized
UPDATE "bgsync"."migrations" SET phase = 'finalized', updated_at = now()
 WHERE name = 'orders_v2' AND phase = 'finalizing'
RETURNING name;
COMMIT;

