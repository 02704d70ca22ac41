-- fleetcert registry, SQLite: policies attached to thing groups.
-- A thing's groups are the names in `things.groups`; a policy attached to a group applies
-- to every certificate of every thing in it, beside the certificate's own policies (as in
-- AWS IoT, where an explicit Deny anywhere wins). The audit's ADD_THINGS_TO_THING_GROUP
-- mitigation puts things into a quarantine group this way.
-- Runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

CREATE TABLE thing_group_policies (
    group_name  TEXT    NOT NULL,
    policy_name TEXT    NOT NULL REFERENCES policies (name),
    attached_at INTEGER NOT NULL,
    PRIMARY KEY (group_name, policy_name)
) WITHOUT ROWID, STRICT;

-- Policies are looked up by name when written (the foreign key's check).
CREATE INDEX thing_group_policies_policy ON thing_group_policies (policy_name);

-- When the policies that apply to a thing through its groups last changed (it joined or
-- left a group, or a policy was attached to one of its groups): live MQTT sessions granted
-- before then must reconnect under the new set. The broker's session poll reads the
-- recent ones; NULL for the many things that never changed.
ALTER TABLE things ADD COLUMN policies_changed_at INTEGER;
CREATE INDEX things_policies_changed_at ON things (policies_changed_at)
    WHERE policies_changed_at IS NOT NULL;
