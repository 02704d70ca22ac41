-- fleetcert registry, PostgreSQL: the AWS IoT Core mirror (settings and outbox).
-- The outbox is filled by a trigger on the event log, so every state change that the
-- mirror follows (thing created/updated, certificate issued/registered/superseded/
-- revoked, policy attached) queues its mirror operation in the SAME transaction as the
-- change: nothing committed can be missed, nothing rolled back can be mirrored.
-- Operations name a subject (thing, certificate serial); the worker reads the subject's
-- current state when it applies one, so a queued operation that is not yet started
-- covers later changes of the same subject (the trigger does not queue it twice; under
-- concurrent writers it may, which costs one idempotent extra application).

CREATE TABLE mirror_settings (
    id                  INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    enabled             BOOLEAN NOT NULL,
    region              TEXT    NOT NULL,
    endpoint_url        TEXT,
    ca_mode             TEXT    NOT NULL CHECK (ca_mode IN ('default', 'sni-only')),
    rotated_status      TEXT    NOT NULL CHECK (rotated_status IN ('REVOKED', 'INACTIVE')),
    ca_certificate_id   TEXT,
    arn_prefix          TEXT,
    updated_at          BIGINT  NOT NULL
);

CREATE TABLE mirror_outbox (
    id          BIGSERIAL PRIMARY KEY,
    queue       TEXT COLLATE "C" NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('thing', 'certificate', 'policy', 'ca')),
    subject     TEXT COLLATE "C" NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('pending', 'parked')),
    created_at  BIGINT  NOT NULL,
    not_before  BIGINT  NOT NULL DEFAULT 0,
    attempts    BIGINT  NOT NULL DEFAULT 0,
    last_error  TEXT,
    lease_owner TEXT,
    lease_until BIGINT,
    event_id    BIGINT
);

CREATE INDEX mirror_outbox_queue ON mirror_outbox (queue, id) WHERE state = 'pending';
CREATE INDEX mirror_outbox_subject ON mirror_outbox (subject, kind) WHERE state = 'pending';
CREATE INDEX mirror_outbox_parked ON mirror_outbox (id) WHERE state = 'parked';

CREATE FUNCTION mirror_enqueue() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    op_kind    TEXT;
    op_subject TEXT;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM mirror_settings WHERE id = 1 AND enabled) THEN
        RETURN NULL;
    END IF;
    IF NEW.kind IN ('thing.created', 'thing.updated') THEN
        op_kind := 'thing';
        op_subject := NEW.thing_name;
    ELSE
        op_kind := 'certificate';
        op_subject := NEW.serial;
    END IF;
    INSERT INTO mirror_outbox (queue, kind, subject, state, created_at, event_id)
    SELECT 'thing:' || NEW.thing_name, op_kind, op_subject, 'pending', NEW.at, NEW.id
    WHERE NOT EXISTS (SELECT 1 FROM mirror_outbox o
                      WHERE o.subject = op_subject AND o.kind = op_kind
                        AND o.state = 'pending' AND o.lease_owner IS NULL);
    RETURN NULL;
END;
$$;

CREATE TRIGGER events_mirror AFTER INSERT ON events
FOR EACH ROW
WHEN (NEW.thing_name IS NOT NULL
    AND (NEW.kind IN ('thing.created', 'thing.updated')
        OR (NEW.serial IS NOT NULL AND NEW.kind IN ('certificate.issued',
            'certificate.registered', 'certificate.superseded', 'certificate.revoked',
            'policy.attached'))))
EXECUTE FUNCTION mirror_enqueue();
