-- The sample blue tables the example plans in plans/ change. The demo, tests and bench load this file.
CREATE TABLE public.orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL,
    amount      integer NOT NULL,
    state       text NOT NULL DEFAULT 'new',
    note        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_customer_id_idx ON public.orders (customer_id);

CREATE TABLE public.accounts (
    id         integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email      text NOT NULL,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE public.sessions (
    token      uuid PRIMARY KEY,
    account_id integer NOT NULL,
    payload    jsonb,
    started_at timestamptz NOT NULL DEFAULT now()
);
