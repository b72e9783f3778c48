-- A realistic shop around the migrated table `orders`: foreign keys both ways (one from a partitioned
-- table), nested views, a view with an INSTEAD OF trigger and a column default, a materialized view,
-- plpgsql and SQL-standard functions, a function returning the table's row type, BEFORE and AFTER
-- triggers, a GIN index, row-level security, a publication, comments, storage parameters and a
-- sequence shared with another table. tests/test_fidelity.py migrates `orders` through every phase.
DO $$ BEGIN CREATE ROLE shop_reader NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN CREATE ROLE shop_writer NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;

CREATE TABLE public.customers (
    id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name   text NOT NULL,
    tenant text NOT NULL DEFAULT 'a'
);

CREATE SEQUENCE public.orders_id_seq;
CREATE TABLE public.orders (
    id           bigint NOT NULL DEFAULT nextval('public.orders_id_seq') PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES public.customers (id) ON DELETE CASCADE,
    amount_cents integer NOT NULL DEFAULT 0 CHECK (amount_cents >= 0),
    status       text NOT NULL DEFAULT 'new',
    note         text,
    fts          tsvector,
    tenant       text NOT NULL DEFAULT 'a',
    updated_at   timestamptz NOT NULL DEFAULT now()
) WITH (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.05);
ALTER SEQUENCE public.orders_id_seq OWNED BY public.orders.id;
-- the same sequence numbers another table: ids must never collide across the two
CREATE TABLE public.legacy_orders (id bigint PRIMARY KEY DEFAULT nextval('public.orders_id_seq'), note text);

COMMENT ON TABLE public.orders IS 'customer orders';
COMMENT ON COLUMN public.orders.amount_cents IS 'order total in cents';
COMMENT ON COLUMN public.orders.note IS 'free text from the customer';
ALTER TABLE public.orders REPLICA IDENTITY FULL;
ALTER TABLE public.orders ALTER COLUMN note SET STATISTICS 500;
ALTER TABLE public.orders ALTER COLUMN note SET STORAGE EXTERNAL;
CREATE INDEX orders_customer_idx ON public.orders (customer_id);
CREATE INDEX orders_fts_idx ON public.orders USING gin (fts);
CREATE INDEX orders_open_status_idx ON public.orders (lower(status) text_pattern_ops) INCLUDE (id) WHERE status <> 'void';

-- inbound foreign keys, one from a partitioned table
CREATE TABLE public.order_items (
    id       bigserial PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES public.orders (id) ON DELETE CASCADE,
    qty      integer NOT NULL
);
CREATE TABLE public.shipments (
    id         bigint NOT NULL,
    order_id   bigint NOT NULL REFERENCES public.orders (id) ON DELETE CASCADE,
    shipped_on date NOT NULL
) PARTITION BY RANGE (shipped_on);
CREATE TABLE public.shipments_2025 PARTITION OF public.shipments FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE public.shipments_2026 PARTITION OF public.shipments FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');

-- triggers the application relies on: a BEFORE trigger (touch + full text) and an AFTER trigger (audit)
CREATE TABLE public.order_events (id bigserial PRIMARY KEY, order_id bigint, op text, at timestamptz DEFAULT now());
CREATE FUNCTION public.orders_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := clock_timestamp();
    NEW.fts := to_tsvector('simple', coalesce(NEW.note, ''));
    RETURN NEW;
END $$;
CREATE TRIGGER orders_touch BEFORE INSERT OR UPDATE ON public.orders
    FOR EACH ROW EXECUTE FUNCTION public.orders_touch();
CREATE FUNCTION public.orders_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.order_events (order_id, op) VALUES (coalesce(NEW.id, OLD.id), TG_OP);
    RETURN NULL;
END $$;
CREATE TRIGGER orders_audit AFTER INSERT OR UPDATE OR DELETE ON public.orders
    FOR EACH ROW EXECUTE FUNCTION public.orders_audit();

-- views: one reads the column the plan renames (its new query is in the plan), nested views, a view
-- with a column default, a comment and an INSTEAD OF trigger
CREATE VIEW public.big_orders AS
    SELECT id, customer_id, amount_cents FROM public.orders WHERE amount_cents > 150000;
CREATE VIEW public.open_orders WITH (security_barrier = true) AS
    SELECT id, customer_id, status, note FROM public.orders WHERE status <> 'closed';
CREATE VIEW public.open_order_notes AS SELECT id, note FROM public.open_orders;
ALTER VIEW public.open_orders ALTER COLUMN status SET DEFAULT 'new';
COMMENT ON VIEW public.open_orders IS 'orders that are not closed';
COMMENT ON COLUMN public.open_orders.note IS 'the customer''s note';
CREATE FUNCTION public.open_orders_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO public.orders (customer_id, status, note)
    VALUES (NEW.customer_id, NEW.status, NEW.note) RETURNING id INTO NEW.id;
    RETURN NEW;
END $$;
CREATE TRIGGER open_orders_insert INSTEAD OF INSERT ON public.open_orders
    FOR EACH ROW EXECUTE FUNCTION public.open_orders_insert();
GRANT SELECT ON public.open_orders, public.open_order_notes TO shop_reader;

-- a materialized view, with an index
CREATE MATERIALIZED VIEW public.order_counts AS
    SELECT customer_id, count(*) AS n FROM public.orders GROUP BY customer_id;
CREATE UNIQUE INDEX order_counts_customer ON public.order_counts (customer_id);
COMMENT ON MATERIALIZED VIEW public.order_counts IS 'orders per customer';
GRANT SELECT ON public.order_counts TO shop_reader;

-- functions: the row type, a SQL-standard body that writes the table, plpgsql that reads it
CREATE FUNCTION public.orders_of(c bigint) RETURNS SETOF public.orders LANGUAGE sql STABLE
    AS $$ SELECT * FROM public.orders WHERE customer_id = c ORDER BY id $$;
CREATE FUNCTION public.set_note(o bigint, n text) RETURNS void LANGUAGE sql
BEGIN ATOMIC
    UPDATE public.orders SET note = n WHERE id = o;
END;
CREATE FUNCTION public.order_count() RETURNS bigint LANGUAGE plpgsql STABLE
    AS $$ BEGIN RETURN (SELECT count(*) FROM public.orders); END $$;
REVOKE ALL ON FUNCTION public.set_note(bigint, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.set_note(bigint, text) TO shop_writer;
COMMENT ON FUNCTION public.orders_of(bigint) IS 'a customer''s orders';

-- row-level security: readers see their tenant only
ALTER TABLE public.orders ENABLE ROW LEVEL SECURITY;
CREATE POLICY orders_tenant ON public.orders FOR SELECT TO shop_reader
    USING (tenant = current_setting('shop.tenant', true));
CREATE POLICY orders_all ON public.orders TO shop_writer USING (true) WITH CHECK (tenant IN ('a', 'b'));
GRANT SELECT ON public.orders TO shop_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON public.orders TO shop_writer;
GRANT USAGE ON SEQUENCE public.orders_id_seq TO shop_writer;

CREATE PUBLICATION shop_pub FOR TABLE public.orders, public.customers;

INSERT INTO public.customers (name, tenant) SELECT 'c' || g, CASE WHEN g % 3 = 0 THEN 'b' ELSE 'a' END
  FROM generate_series(1, 50) g;
INSERT INTO public.orders (customer_id, amount_cents, status, note, tenant)
SELECT 1 + g % 50, (g * 7919) % 400000, (ARRAY['new', 'paid', 'closed', 'void'])[1 + g % 4], 'note ' || g,
       CASE WHEN (1 + g % 50) % 3 = 0 THEN 'b' ELSE 'a' END
  FROM generate_series(1, 3000) g;
INSERT INTO public.order_items (order_id, qty) SELECT id, 1 + id % 3 FROM public.orders WHERE id % 2 = 0;
INSERT INTO public.shipments SELECT id, id, date '2025-06-01' + (id % 400)::int FROM public.orders WHERE id % 3 = 0;
INSERT INTO public.legacy_orders (note) VALUES ('legacy 1'), ('legacy 2');
REFRESH MATERIALIZED VIEW public.order_counts;
ANALYZE;
