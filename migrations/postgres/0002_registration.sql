-- fleetcert registry, PostgreSQL: just-in-time registration.
-- Thing details and a version (optimistic concurrency), the certificate's registration
-- time, immutable policies and their attachments to certificates, and a short history of
-- device connections (pruned to the newest 32 per certificate by the application).

ALTER TABLE things
    ADD COLUMN thing_type    TEXT,
    ADD COLUMN attributes    JSONB  NOT NULL DEFAULT '{}'::jsonb
        CHECK (jsonb_typeof(attributes) = 'object'),
    ADD COLUMN groups        JSONB  NOT NULL DEFAULT '[]'::jsonb
        CHECK (jsonb_typeof(groups) = 'array'),
    ADD COLUMN billing_group TEXT,
    ADD COLUMN version       BIGINT NOT NULL DEFAULT 1 CHECK (version >= 1);

ALTER TABLE certificates ADD COLUMN registered_at BIGINT;

-- `json`, not `jsonb`: a policy document is kept exactly as written (jsonb would rewrite
-- number spellings), so that it reads back equal to what the template gave.
CREATE TABLE policies (
    name        TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    document    JSON   NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE policy_attachments (
    policy_name TEXT COLLATE "C" NOT NULL REFERENCES policies (name),
    serial      TEXT COLLATE "C" NOT NULL REFERENCES certificates (serial),
    attached_at BIGINT NOT NULL,
    PRIMARY KEY (policy_name, serial)
);

CREATE INDEX policy_attachments_serial ON policy_attachments (serial);

CREATE TABLE connections (
    id                  BIGSERIAL PRIMARY KEY,
    fingerprint_sha256  TEXT COLLATE "C" NOT NULL,
    thing_name          TEXT COLLATE "C" NOT NULL,
    client_addr         TEXT   NOT NULL,
    at                  BIGINT NOT NULL
);

CREATE INDEX connections_fingerprint_id ON connections (fingerprint_sha256, id);
