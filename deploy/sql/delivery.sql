-- The delivery system's own database (SQLite): the driver's stops, keyed by the canonical
-- customer key, with the warehouse only delivery knows. Mapped onto the canonical Customer by
-- delivery.toml.
--
-- SQLite has no server to run this: the `delivery-install` service runs it with `sqlite3` on
-- the database file in the `delivery-data` volume (idempotent), then `concord-sql install`.
-- The table starts empty: customers come from orders.

-- Readers (the driver's app) and the adapter's writer do not block each other.
PRAGMA journal_mode = WAL;

CREATE TABLE IF NOT EXISTS stops (
  stop_id TEXT PRIMARY KEY,
  customer_name TEXT,
  addr TEXT,
  phone TEXT,
  language TEXT,
  status TEXT,
  warehouse TEXT,
  notes TEXT
);
