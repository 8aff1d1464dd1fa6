-- A small sample schema for trying cachesync by hand (loaded by deploy/dev/postgres.sh).
CREATE TABLE IF NOT EXISTS users (
    id         bigint PRIMARY KEY,
    name       text NOT NULL,
    email      text UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    tags       text[] NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS orders (
    tenant  text NOT NULL,
    id      int NOT NULL,
    total   numeric(12, 2) NOT NULL,
    status  text NOT NULL DEFAULT 'open',
    details jsonb,
    PRIMARY KEY (tenant, id)
);
-- A view: CDC cannot follow it (patterns/refresh-ahead.toml keeps it fresh instead).
CREATE OR REPLACE VIEW tenant_totals AS
    SELECT tenant, count(*)::int AS orders, sum(total) AS total,
           count(*) FILTER (WHERE status = 'open')::int AS open
    FROM orders GROUP BY tenant;
INSERT INTO users (id, name, email, tags) VALUES
    (1, 'Ada Lovelace', 'ada@example.com', '{admin}'),
    (2, 'Alan Turing', 'alan@example.com', '{}'),
    (3, 'Grace Hopper', NULL, '{navy,compilers}')
ON CONFLICT DO NOTHING;
INSERT INTO orders (tenant, id, total, details) VALUES
    ('acme', 1, 19.99, '{"items": 2}'),
    ('acme', 2, 5.00, NULL),
    ('globex', 1, 120.50, '{"items": 7, "gift": true}')
ON CONFLICT DO NOTHING;
