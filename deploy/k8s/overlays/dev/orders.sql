-- The orders system's own database (PostgreSQL): the salesperson's customers, in its own table
-- and columns (the seed scenario; compare support.sql and delivery.sql, which hold the same
-- customers differently). Mapped onto the canonical Customer by orders.toml.
--
-- docker-compose.yml mounts this file into /docker-entrypoint-initdb.d: the postgres container
-- runs it once, on a new volume, as the database owner `orders`. The `orders-install` service
-- then runs `concord-sql install` (change-log table and capture triggers) and the adapter
-- publishes the rows below as a snapshot on its first start (`snapshot_on_first_start`).

CREATE TABLE IF NOT EXISTS clients (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  full_name TEXT NOT NULL,
  email TEXT UNIQUE,
  phone TEXT,
  address JSONB,
  tier TEXT,
  paid NUMERIC(12, 2),
  lang TEXT,
  delivery_state TEXT,
  tickets INTEGER,
  agent TEXT,
  updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The salesperson's first customers. orders is the only system that may create customers
-- (`create = ["orders"]` in the policy), so these appear in support and delivery.
INSERT INTO clients (full_name, email, phone, address, tier, paid, lang) VALUES
  ('Ada Lovelace', 'ada@example.com', '+44 20 7946 0001',
   '{"street": "12 St James''s Square", "city": "London", "country": "GB"}', 'gold', 125.50, 'en'),
  ('Grace Hopper', 'grace@example.com', '+1 212 555 0102',
   '{"street": "1 Navy Yard", "city": "Arlington", "country": "US"}', 'silver', 48.00, 'en');
