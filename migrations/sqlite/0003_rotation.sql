-- fleetcert registry, SQLite: rotation, revocation and CRLs.
-- Every certificate has a renewal point (`renew_at`) and, if a rotation made it, the
-- serial it replaces. A rotation is one row per *old* certificate, claimed by workers
-- with leases. Signed CRLs are kept so every server hands out the same one.
-- Runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

ALTER TABLE certificates ADD COLUMN renew_at INTEGER NOT NULL DEFAULT 0;
-- Certificates issued before this migration renew at 2/3 of their lifetime.
UPDATE certificates SET renew_at = not_before + (not_after - not_before) * 2 / 3;
ALTER TABLE certificates ADD COLUMN replaces TEXT REFERENCES certificates (serial);

CREATE INDEX certificates_status_renew_at ON certificates (status, renew_at);
CREATE INDEX certificates_replaces ON certificates (replaces) WHERE replaces IS NOT NULL;

CREATE TABLE rotations (
    old_serial  TEXT    NOT NULL PRIMARY KEY REFERENCES certificates (serial),
    thing_name  TEXT    NOT NULL,
    origin      TEXT    NOT NULL CHECK (origin IN ('generated', 'csr')),
    state       TEXT    NOT NULL
        CHECK (state IN ('due', 'issued', 'delivered', 'confirmed', 'failed', 'cancelled')),
    due_at      INTEGER NOT NULL,
    new_serial  TEXT    REFERENCES certificates (serial),
    -- The replacement's private key, encrypted by the application; deleted on delivery.
    sealed_key  BLOB,
    lease_owner TEXT,
    lease_until INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    updated_at  INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

CREATE INDEX rotations_claim ON rotations (state, origin, due_at);
CREATE INDEX rotations_new_serial ON rotations (new_serial) WHERE new_serial IS NOT NULL;
CREATE INDEX rotations_thing ON rotations (thing_name);

CREATE TABLE crls (
    number          INTEGER NOT NULL PRIMARY KEY,
    this_update     INTEGER NOT NULL,
    next_update     INTEGER NOT NULL,
    entries_digest  TEXT    NOT NULL,
    entry_count     INTEGER NOT NULL,
    der             BLOB    NOT NULL,
    created_at      INTEGER NOT NULL
) STRICT;
