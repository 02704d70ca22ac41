-- fleetcert registry, SQLite: the Device Defender audit.
-- An audit task is recorded whole, with its findings, in one transaction: its summary is
-- the notification AWS sends (taskId, taskStatus, auditDetails[], ...). A suppression
-- keeps a check's findings for one resource out of the non-compliant counts until it
-- expires (NULL: until it is deleted); the findings are still recorded, marked suppressed.
-- Runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

CREATE TABLE audit_tasks (
    task_id      TEXT    NOT NULL PRIMARY KEY,
    task_type    TEXT    NOT NULL CHECK (task_type IN ('ON_DEMAND_AUDIT_TASK', 'SCHEDULED_AUDIT_TASK')),
    task_status  TEXT    NOT NULL CHECK (task_status IN ('COMPLETED', 'FAILED')),
    started_at   INTEGER NOT NULL,
    finished_at  INTEGER NOT NULL,
    summary      TEXT    NOT NULL CHECK (json_valid(summary))
) WITHOUT ROWID, STRICT;

CREATE INDEX audit_tasks_started ON audit_tasks (started_at);

CREATE TABLE audit_findings (
    finding_id          TEXT    NOT NULL PRIMARY KEY,
    task_id             TEXT    NOT NULL REFERENCES audit_tasks (task_id),
    check_name          TEXT    NOT NULL,
    severity            TEXT    NOT NULL,
    reason_code         TEXT    NOT NULL,
    reason_description  TEXT    NOT NULL,
    resource_type       TEXT    NOT NULL,
    resource_id         TEXT    NOT NULL,
    detail              TEXT    NOT NULL CHECK (json_valid(detail)),
    suppressed          INTEGER NOT NULL CHECK (suppressed IN (0, 1)),
    found_at            INTEGER NOT NULL
) WITHOUT ROWID, STRICT;

CREATE INDEX audit_findings_task ON audit_findings (task_id, check_name);
CREATE INDEX audit_findings_check ON audit_findings (check_name, found_at);
CREATE INDEX audit_findings_resource ON audit_findings (resource_id, found_at);

CREATE TABLE audit_suppressions (
    check_name   TEXT    NOT NULL,
    resource_id  TEXT    NOT NULL,
    expires_at   INTEGER,
    description  TEXT    NOT NULL DEFAULT '',
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (check_name, resource_id)
) WITHOUT ROWID, STRICT;

-- The audit reads MQTT sessions by time (the connection records of the broker plugin).
CREATE INDEX connections_sessions_at ON connections (at) WHERE client_id IS NOT NULL;
