-- fleetcert registry, PostgreSQL: things, certificates and the append-only event log.
-- Times are Unix seconds. Later migrations (0002+) add policies, attachments, leases, outbox.
-- Names and serials use the "C" collation so that ordering matches the SQLite backend.

CREATE TABLE things (
    name        TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    template    TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE certificates (
    serial              TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    fingerprint_sha256  TEXT COLLATE "C" NOT NULL UNIQUE,
    public_key_sha256   TEXT   NOT NULL,
    thing_name          TEXT COLLATE "C" NOT NULL REFERENCES things (name),
    issuer              TEXT   NOT NULL,
    status              TEXT   NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
    origin              TEXT   NOT NULL CHECK (origin IN ('generated', 'csr')),
    key_algorithm       TEXT   NOT NULL,
    not_before          BIGINT NOT NULL,
    not_after           BIGINT NOT NULL,
    created_at          BIGINT NOT NULL,
    delivered_at        BIGINT,
    revoked_at          BIGINT,
    revocation_reason   TEXT,
    der                 BYTEA  NOT NULL
);

CREATE INDEX certificates_thing_status ON certificates (thing_name, status);
CREATE INDEX certificates_status_not_after ON certificates (status, not_after);

CREATE TABLE events (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    thing_name  TEXT COLLATE "C",
    serial      TEXT COLLATE "C",
    detail      JSONB  NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX events_thing_name ON events (thing_name) WHERE thing_name IS NOT NULL;
CREATE INDEX events_serial ON events (serial) WHERE serial IS NOT NULL;

-- The event log is append-only.
CREATE FUNCTION fleetcert_events_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only' USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION fleetcert_events_append_only();

CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION fleetcert_events_append_only();
