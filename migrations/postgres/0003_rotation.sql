-- fleetcert registry, PostgreSQL: rotation, revocation and CRLs.
-- Every certificate has a renewal point (`renew_at`) and, if a rotation made it, the
-- serial it replaces. A rotation is one row per *old* certificate, claimed by workers
-- with leases (SELECT … FOR UPDATE SKIP LOCKED). Signed CRLs are kept so every server
-- hands out the same one.

ALTER TABLE certificates ADD COLUMN renew_at BIGINT NOT NULL DEFAULT 0;
-- Certificates issued before this migration renew at 2/3 of their lifetime.
UPDATE certificates SET renew_at = not_before + (not_after - not_before) * 2 / 3;
ALTER TABLE certificates ADD COLUMN replaces TEXT COLLATE "C" REFERENCES certificates (serial);

-- Due selection walks the active certificates in (renew_at, serial) order.
CREATE INDEX certificates_status_renew_at ON certificates (status, renew_at, serial);
CREATE INDEX certificates_replaces ON certificates (replaces) WHERE replaces IS NOT NULL;

CREATE TABLE rotations (
    old_serial  TEXT COLLATE "C" NOT NULL PRIMARY KEY REFERENCES certificates (serial),
    thing_name  TEXT COLLATE "C" NOT NULL,
    origin      TEXT   NOT NULL CHECK (origin IN ('generated', 'csr')),
    state       TEXT   NOT NULL
        CHECK (state IN ('due', 'issued', 'delivered', 'confirmed', 'failed', 'cancelled')),
    due_at      BIGINT NOT NULL,
    new_serial  TEXT COLLATE "C" REFERENCES certificates (serial),
    -- The replacement's private key, encrypted by the application; deleted on delivery.
    sealed_key  BYTEA,
    lease_owner TEXT,
    lease_until BIGINT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    updated_at  BIGINT NOT NULL
);

-- Claims walk this in (due_at, old_serial) order within state 'due' and one origin.
CREATE INDEX rotations_claim ON rotations (state, origin, due_at, old_serial);
CREATE INDEX rotations_new_serial ON rotations (new_serial) WHERE new_serial IS NOT NULL;
CREATE INDEX rotations_thing ON rotations (thing_name);

CREATE TABLE crls (
    number          BIGINT NOT NULL PRIMARY KEY,
    this_update     BIGINT NOT NULL,
    next_update     BIGINT NOT NULL,
    entries_digest  TEXT   NOT NULL,
    entry_count     BIGINT NOT NULL,
    der             BYTEA  NOT NULL,
    created_at      BIGINT NOT NULL
);
