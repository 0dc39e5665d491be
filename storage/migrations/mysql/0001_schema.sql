-- pingme's MySQL/MariaDB schema (InnoDB). Embedded in the binary and
-- applied at start by `MysqlStore::connect` (sqlx's migrator: one version
-- row per file in `_sqlx_migrations`, a named lock so two servers starting
-- together apply it once). Text ids compare byte for byte (utf8mb4_bin),
-- like the embedded store; conversation and idempotency keys are the
-- shared binary encodings of `codec.rs`.

CREATE TABLE IF NOT EXISTS users (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  username VARCHAR(255) NOT NULL,
  password_hash VARCHAR(255) NOT NULL,
  created_ms BIGINT NOT NULL,
  UNIQUE KEY by_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS devices (
  user_id BIGINT UNSIGNED NOT NULL,
  device_id VARCHAR(255) NOT NULL,
  token_generation BIGINT UNSIGNED NOT NULL DEFAULT 0,
  last_login_ms BIGINT NOT NULL,
  PRIMARY KEY (user_id, device_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS chat_groups (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  name VARCHAR(255) NOT NULL,
  owner_id BIGINT UNSIGNED NOT NULL,
  member_count BIGINT UNSIGNED NOT NULL,
  created_ms BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- members_page is a range on the primary key.
CREATE TABLE IF NOT EXISTS members (
  group_id BIGINT UNSIGNED NOT NULL,
  user_id BIGINT UNSIGNED NOT NULL,
  role TINYINT UNSIGNED NOT NULL,
  PRIMARY KEY (group_id, user_id)
) ENGINE=InnoDB;

-- Groups joined and direct conversations with a message, per user.
CREATE TABLE IF NOT EXISTS user_conversations (
  user_id BIGINT UNSIGNED NOT NULL,
  conversation_id VARBINARY(17) NOT NULL,
  PRIMARY KEY (user_id, conversation_id)
) ENGINE=InnoDB;

-- One row per conversation that has had an append: the seq counter, and
-- the row lock that serialises seq assignment across writers and servers.
CREATE TABLE IF NOT EXISTS conversations (
  conversation_id VARBINARY(17) NOT NULL PRIMARY KEY,
  latest_seq BIGINT UNSIGNED NOT NULL
) ENGINE=InnoDB;

-- A timeline is a clustered range scan; (conversation, seq) is unique, so
-- a seq is never stored twice even if a writer lost its lock; the
-- idempotency key (sender big-endian + client_msg_id) is unique too.
CREATE TABLE IF NOT EXISTS messages (
  conversation_id VARBINARY(17) NOT NULL,
  seq BIGINT UNSIGNED NOT NULL,
  idempotency_key VARBINARY(263) NOT NULL,
  msg_id VARCHAR(255) NOT NULL,
  sender_id BIGINT UNSIGNED NOT NULL,
  sender_device VARCHAR(255) NOT NULL,
  client_msg_id VARCHAR(255) NOT NULL,
  content_type INT NOT NULL,
  body MEDIUMBLOB NOT NULL,
  server_time_ms BIGINT NOT NULL,
  PRIMARY KEY (conversation_id, seq),
  UNIQUE KEY idempotency (idempotency_key)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS delivered (
  user_id BIGINT UNSIGNED NOT NULL,
  device_id VARCHAR(255) NOT NULL,
  conversation_id VARBINARY(17) NOT NULL,
  seq BIGINT UNSIGNED NOT NULL,
  PRIMARY KEY (user_id, device_id, conversation_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

CREATE TABLE IF NOT EXISTS read_marks (
  user_id BIGINT UNSIGNED NOT NULL,
  conversation_id VARBINARY(17) NOT NULL,
  seq BIGINT UNSIGNED NOT NULL,
  PRIMARY KEY (user_id, conversation_id)
) ENGINE=InnoDB;

-- InnoDB keeps the AUTO_INCREMENT counter across restarts (MariaDB
-- 10.2.4+), so dead-letter ids are never reused after a removal.
CREATE TABLE IF NOT EXISTS dead_letters (
  id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
  kind VARCHAR(255) NOT NULL,
  payload MEDIUMBLOB NOT NULL,
  code INT UNSIGNED NOT NULL,
  error TEXT NOT NULL,
  attempts INT UNSIGNED NOT NULL,
  created_ms BIGINT NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;
