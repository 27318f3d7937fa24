-- The support system's own database (MariaDB): the support desk's customers, with their own
-- key, column names, tier codes and the driver's notes. Mapped onto the canonical Customer by
-- support.toml.
--
-- docker-compose.yml mounts this file into /docker-entrypoint-initdb.d: the mariadb container
-- runs it once, on a new volume, in the database `support`. The `support-install` service then
-- runs `concord-sql install`. The table starts empty: customers come from orders.

CREATE TABLE IF NOT EXISTS customers (
  cust_no INT AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(200),
  email VARCHAR(200),
  phone VARCHAR(50),
  address JSON,
  tier ENUM('B', 'S', 'G'),
  amount DECIMAL(12, 2),
  language VARCHAR(10),
  status VARCHAR(40),
  tickets INT UNSIGNED,
  agent VARCHAR(100),
  notes TEXT
);
