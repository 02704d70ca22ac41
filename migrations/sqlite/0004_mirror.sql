-- fleetcert registry, SQLite: the AWS IoT Core mirror (settings and outbox).
-- The outbox is filled by a trigger on the event log, so every state change that the
-- mirror follows (thing created/updated, certificate issued/registered/superseded/
-- revoked, policy attached) queues its mirror operation in the SAME transaction as the
-- change: nothing committed can be missed, nothing rolled back can be mirrored.
-- Operations name a subject (thing, certificate serial); the worker reads the subject's
-- current state when it applies one, so a queued operation that is not yet started
-- covers later changes of the same subject (the trigger does not queue it twice).
-- Runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

CREATE TABLE mirror_settings (
    id                  INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    enabled             INTEGER NOT NULL CHECK (enabled IN (0, 1)),
    region              TEXT    NOT NULL,
    endpoint_url        TEXT,
    ca_mode             TEXT    NOT NULL CHECK (ca_mode IN ('default', 'sni-only')),
    rotated_status      TEXT    NOT NULL CHECK (rotated_status IN ('REVOKED', 'INACTIVE')),
    -- Filled once the issuing CA is registered: its AWS id and the ARN prefix
    -- (`arn:PARTITION:iot:REGION:ACCOUNT:`) that certificate ARNs share.
    ca_certificate_id   TEXT,
    arn_prefix          TEXT,
    updated_at          INTEGER NOT NULL
) STRICT;

CREATE TABLE mirror_outbox (
    id          INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    -- Operations of one queue apply in id order; queues are independent.
    queue       TEXT    NOT NULL,
    kind        TEXT    NOT NULL CHECK (kind IN ('thing', 'certificate', 'policy', 'ca')),
    subject     TEXT    NOT NULL,
    state       TEXT    NOT NULL CHECK (state IN ('pending', 'parked')),
    created_at  INTEGER NOT NULL,
    -- Backoff: not applied before this time.
    not_before  INTEGER NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    last_error  TEXT,
    lease_owner TEXT,
    lease_until INTEGER,
    event_id    INTEGER
) STRICT;

CREATE INDEX mirror_outbox_queue ON mirror_outbox (queue, id) WHERE state = 'pending';
CREATE INDEX mirror_outbox_subject ON mirror_outbox (subject, kind) WHERE state = 'pending';
CREATE INDEX mirror_outbox_parked ON mirror_outbox (id) WHERE state = 'parked';

CREATE TRIGGER events_mirror AFTER INSERT ON events
WHEN NEW.thing_name IS NOT NULL
    AND (NEW.kind IN ('thing.created', 'thing.updated')
        OR (NEW.serial IS NOT NULL AND NEW.kind IN ('certificate.issued',
            'certificate.registered', 'certificate.superseded', 'certificate.revoked',
            'policy.attached')))
    AND EXISTS (SELECT 1 FROM mirror_settings WHERE id = 1 AND enabled = 1)
BEGIN
    INSERT INTO mirror_outbox (queue, kind, subject, state, created_at, event_id)
    SELECT 'thing:' || NEW.thing_name, op.kind, op.subject, 'pending', NEW.at, NEW.id
    FROM (SELECT CASE WHEN NEW.kind LIKE 'thing.%' THEN 'thing' ELSE 'certificate' END AS kind,
                 CASE WHEN NEW.kind LIKE 'thing.%' THEN NEW.thing_name ELSE NEW.serial END
                     AS subject) AS op
    WHERE NOT EXISTS (SELECT 1 FROM mirror_outbox o
                      WHERE o.subject = op.subject AND o.kind = op.kind
                        AND o.state = 'pending' AND o.lease_owner IS NULL);
END;
