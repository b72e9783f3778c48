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
-- green's own sequence for id (blue's is orders_id_seq)
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
-- copy grant INSERT to app_rw
GRANT INSERT ON "public"."orders_v2" TO "app_rw";
-- copy grant SELECT to app_rw
GRANT SELECT ON "public"."orders_v2" TO "app_rw";
-- sequence usage for app_rw, who may write blue
GRANT USAGE, SELECT ON SEQUENCE "public"."orders_v2_id_seq" TO "app_rw";
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
        '{"checks": [{"expression": "total_amount >= 0", "name": "orders_total_amount_nonneg"}], "columns": [{"default": null, "from": null, "name": "id", "not_null": true, "reverse": null, "reverse_column": null, "type": "bigint"}, {"default": null, "from": null, "name": "customer_id", "not_null": true, "reverse": null, "reverse_column": null, "type": "bigint"}, {"default": null, "from": "amount::numeric(12,2)", "name": "total_amount", "not_null": true, "reverse": "round(total_amount)::integer", "reverse_column": "amount", "type": "numeric(12,2)"}, {"default": "''new''", "from": "state", "name": "status", "not_null": true, "reverse": null, "reverse_column": null, "type": "text"}, {"default": null, "from": null, "name": "note", "not_null": false, "reverse": null, "reverse_column": null, "type": "text"}, {"default": "now()", "from": null, "name": "created_at", "not_null": true, "reverse": null, "reverse_column": null, "type": "timestamptz"}], "cutover": {"mode": "rename", "retired_name": "orders_old"}, "indexes": [{"columns": ["customer_id"], "definition": null, "name": null, "unique": false, "where": null}, {"columns": ["status"], "definition": null, "name": null, "unique": false, "where": "status <> ''void''"}], "key": ["id"], "name": "orders_v2", "source": "public.orders", "target": "public.orders_v2", "versions": null, "views": []}'::jsonb,  E'{"blue": {"name": "orders", "schema": "public"}, "blue_columns": ["id", "customer_id", "amount", "state", "note", "created_at"], "blue_generated": [], "blue_identity_always": [], "blue_key": ["id"], "blue_key_collations": [null], "blue_key_types": ["bigint"], "blue_owner": "postgres", "bulk": true, "checks": [{"expression": "total_amount >= 0", "name": "orders_total_amount_nonneg"}], "columns": [{"blue_sequence": "orders_id_seq", "default": "nextval(''\\"public\\".\\"orders_v2_id_seq\\"''::regclass)", "default_inherited": true, "generated": null, "identity": "", "name": "id", "not_null": true, "reverse_column": "id", "reverse_expr": "\\"id\\"", "reverse_origin": "column", "sequence": "orders_v2_id_seq", "shared_sequence": null, "source_expr": "\\"id\\"", "type": "bigint"}, {"blue_sequence": null, "default": null, "default_inherited": false, "generated": null, "identity": "", "name": "customer_id", "not_null": true, "reverse_column": "customer_id", "reverse_expr": "\\"customer_id\\"", "reverse_origin": "column", "sequence": null, "shared_sequence": null, "source_expr": "\\"customer_id\\"", "type": "bigint"}, {"blue_sequence": null, "default": null, "default_inherited": false, "generated": null, "identity": "", "name": "total_amount", "not_null": true, "reverse_column": "amount", "reverse_expr": "round(total_amount)::integer", "reverse_origin": "explicit", "sequence": null, "shared_sequence": null, "source_expr": "amount::numeric(12,2)", "type": "numeric(12,2)"}, {"blue_sequence": null, "default": "''new''", "default_inherited": false, "generated": null, "identity": "", "name": "status", "not_null": true, "reverse_column": "state", "reverse_expr": "\\"status\\"", "reverse_origin": "column", "sequence": null, "shared_sequence": null, "source_expr": "state", "type": "text"}, {"blue_sequence": null, "default": null, "default_inherited": false, "generated": null, "identity": "", "name": "note", "not_null": false, "reverse_column": "note", "reverse_expr": "\\"note\\"", "reverse_origin": "column", "sequence": null, "shared_sequence": null, "source_expr": "\\"note\\"", "type": "text"}, {"blue_sequence": null, "default": "now()", "default_inherited": false, "generated": null, "identity": "", "name": "created_at", "not_null": true, "reverse_column": "created_at", "reverse_expr": "\\"created_at\\"", "reverse_origin": "column", "sequence": null, "shared_sequence": null, "source_expr": "\\"created_at\\"", "type": "timestamptz"}], "feeds": [{"blue_column": "id", "how": "copied back", "source": "id"}, {"blue_column": "customer_id", "how": "copied back", "source": "customer_id"}, {"blue_column": "amount", "how": "reverse", "source": "round(total_amount)::integer"}, {"blue_column": "state", "how": "copied back", "source": "status"}, {"blue_column": "note", "how": "copied back", "source": "note"}, {"blue_column": "created_at", "how": "copied back", "source": "created_at"}], "forward_function": {"name": "orders_v2_forward", "schema": "bgsync"}, "grants": [["app_rw", "INSERT", false], ["app_rw", "SELECT", false]], "green": {"name": "orders_v2", "schema": "public"}, "green_key": ["id"], "indexes": [{"columns": ["customer_id"], "definition": null, "name": "orders_v2_customer_id_idx", "unique": false, "where": null}, {"columns": ["status"], "definition": null, "name": "orders_v2_status_idx", "unique": false, "where": "status <> ''void''"}], "name": "orders_v2", "plan_hash": "71c1a68d96fb6123", "primary_key_name": "orders_v2_pkey", "retired": {"name": "orders_old", "schema": "public"}, "search_path": ["pg_catalog", "public", "pg_temp"], "settings": {}, "state_schema": "bgsync", "triggers": {"del": "bgsync_orders_v2_fwd_del", "ins": "bgsync_orders_v2_fwd_ins", "trunc": "bgsync_orders_v2_fwd_trunc", "upd": "bgsync_orders_v2_fwd_upd"}, "versions": {}, "views": []}'::jsonb, NULL)
ON CONFLICT (name) DO UPDATE
   SET phase = 'prepared', plan_hash = EXCLUDED.plan_hash, plan = EXCLUDED.plan, spec = EXCLUDED.spec,
       plan_source = EXCLUDED.plan_source, source = EXCLUDED.source, target = EXCLUDED.target, updated_at = now()
 WHERE "bgsync"."migrations".phase IN ('rolled_back', 'finalized')
RETURNING name;
COMMIT;

