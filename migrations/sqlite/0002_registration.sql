-- fleetcert registry, SQLite: just-in-time registration.
-- Thing details and a version (optimistic concurrency), the certificate's registration
-- time, immutable policies and their attachments to certificates, and a short history of
-- device connections (pruned to the newest 32 per certificate by the application).
-- Runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

ALTER TABLE things ADD COLUMN thing_type TEXT;
ALTER TABLE things ADD COLUMN attributes TEXT NOT NULL DEFAULT '{}'
    CHECK (json_valid(attributes) AND json_type(attributes) = 'object');
ALTER TABLE things ADD COLUMN groups TEXT NOT NULL DEFAULT '[]'
    CHECK (json_valid(groups) AND json_type(groups) = 'array');
ALTER TABLE things ADD COLUMN billing_group TEXT;
ALTER TABLE things ADD COLUMN version INTEGER NOT NULL DEFAULT 1 CHECK (version >= 1);

ALTER TABLE certificates ADD COLUMN registered_at INTEGER;

CREATE TABLE policies (
    name        TEXT    NOT NULL PRIMARY KEY,
    document    TEXT    NOT NULL CHECK (json_valid(document)),
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

CREATE TABLE policy_attachments (
    policy_name TEXT    NOT NULL REFERENCES policies (name),
    serial      TEXT    NOT NULL REFERENCES certificates (serial),
    attached_at INTEGER NOT NULL,
    PRIMARY KEY (policy_name, serial)
) WITHOUT ROWID, STRICT;

CREATE INDEX policy_attachments_serial ON policy_attachments (serial);

CREATE TABLE connections (
    id                  INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    fingerprint_sha256  TEXT    NOT NULL,
    thing_name          TEXT    NOT NULL,
    client_addr         TEXT    NOT NULL,
    at                  INTEGER NOT NULL
) STRICT;

CREATE INDEX connections_fingerprint_id ON connections (fingerprint_sha256, id);
