-- fleetcert registry, SQLite: things, certificates and the append-only event log.
-- Times are Unix seconds. Later migrations (0002+) add policies, attachments, leases, outbox.

CREATE TABLE things (
    name        TEXT    NOT NULL PRIMARY KEY,
    template    TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

CREATE TABLE certificates (
    serial              TEXT    NOT NULL PRIMARY KEY,
    fingerprint_sha256  TEXT    NOT NULL UNIQUE,
    public_key_sha256   TEXT    NOT NULL,
    thing_name          TEXT    NOT NULL REFERENCES things (name),
    issuer              TEXT    NOT NULL,
    status              TEXT    NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
    origin              TEXT    NOT NULL CHECK (origin IN ('generated', 'csr')),
    key_algorithm       TEXT    NOT NULL,
    not_before          INTEGER NOT NULL,
    not_after           INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    delivered_at        INTEGER,
    revoked_at          INTEGER,
    revocation_reason   TEXT,
    der                 BLOB    NOT NULL
) STRICT;

CREATE INDEX certificates_thing_status ON certificates (thing_name, status);
CREATE INDEX certificates_status_not_after ON certificates (status, not_after);

CREATE TABLE events (
    id          INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    thing_name  TEXT,
    serial      TEXT,
    detail      TEXT    NOT NULL DEFAULT '{}' CHECK (json_valid(detail))
) STRICT;

CREATE INDEX events_thing_name ON events (thing_name) WHERE thing_name IS NOT NULL;
CREATE INDEX events_serial ON events (serial) WHERE serial IS NOT NULL;

-- The event log is append-only.
CREATE TRIGGER events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;

CREATE TRIGGER events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only');
END;
