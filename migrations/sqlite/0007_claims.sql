-- fleetcert registry, SQLite: provisioning by claim (AWS IoT Fleet Provisioning).
-- A claim certificate is shared by a batch of devices and may only ask for their own
-- certificates; it is never a thing's certificate, so it lives apart from `certificates`
-- (no JITP path can ever register it). A certificate issued through the Fleet
-- Provisioning API waits in `provisional_certificates` until RegisterThing moves it into
-- `certificates`; the ownership token is stored as its SHA-256 only. Revoked claims and
-- revoked provisional certificates are listed on the CRL with the others.
-- Runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

CREATE TABLE claims (
    name                TEXT    NOT NULL PRIMARY KEY,
    template            TEXT    NOT NULL,
    serial              TEXT    NOT NULL UNIQUE,
    fingerprint_sha256  TEXT    NOT NULL UNIQUE,
    status              TEXT    NOT NULL CHECK (status IN ('active', 'revoked')),
    max_uses            INTEGER CHECK (max_uses IS NULL OR max_uses >= 1),
    uses                INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0),
    not_before          INTEGER NOT NULL,
    not_after           INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    revoked_at          INTEGER,
    der                 BLOB    NOT NULL
) WITHOUT ROWID, STRICT;

CREATE TABLE provisional_certificates (
    serial              TEXT    NOT NULL PRIMARY KEY,
    fingerprint_sha256  TEXT    NOT NULL UNIQUE,
    public_key_sha256   TEXT    NOT NULL,
    claim_name          TEXT    NOT NULL REFERENCES claims (name),
    token_sha256        TEXT    NOT NULL UNIQUE,
    session             TEXT    NOT NULL,
    issuer              TEXT    NOT NULL,
    origin              TEXT    NOT NULL CHECK (origin IN ('generated', 'csr')),
    key_algorithm       TEXT    NOT NULL,
    not_before          INTEGER NOT NULL,
    not_after           INTEGER NOT NULL,
    renew_at            INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    token_expires_at    INTEGER NOT NULL,
    state               TEXT    NOT NULL CHECK (state IN ('pending', 'registered', 'revoked')),
    thing_name          TEXT,
    finished_at         INTEGER,
    der                 BLOB    NOT NULL
) WITHOUT ROWID, STRICT;

CREATE INDEX provisional_pending_expiry ON provisional_certificates (token_expires_at)
    WHERE state = 'pending';

-- The CRL's revoked set reads only the revoked rows.
CREATE INDEX claims_revoked ON claims (not_after) WHERE status = 'revoked';
CREATE INDEX provisional_revoked ON provisional_certificates (not_after)
    WHERE state = 'revoked';
