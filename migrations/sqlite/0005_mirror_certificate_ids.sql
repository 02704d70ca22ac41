-- fleetcert registry, SQLite: the AWS ids of mirrored certificates.
-- The mirror attaches policies and things to a certificate, and changes its status, by
-- the certificateId / certificateArn that AWS returned when it registered the certificate
-- (or named in its "already exists" answer), never by an id computed here: AWS computes
-- the SHA-256 of the DER, but moto and LocalStack by default hash the PEM text.
-- One row per certificate the mirror registered; rows go when `aws enable` points the
-- mirror at another region or endpoint (another account: the ids mean nothing there).
-- Runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

CREATE TABLE mirror_certificates (
    serial          TEXT    NOT NULL PRIMARY KEY REFERENCES certificates (serial),
    certificate_id  TEXT    NOT NULL,
    certificate_arn TEXT    NOT NULL,
    recorded_at     INTEGER NOT NULL
) STRICT;
