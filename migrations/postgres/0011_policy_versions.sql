-- fleetcert registry, PostgreSQL: policy versions.
-- A policy's document is its default version's (`policies.document`, which every reader
-- already uses); `default_version` numbers it. The audit's REPLACE_DEFAULT_POLICY_VERSION
-- mitigation adds a version and makes it the default: `policy_versions` then keeps every
-- version of that policy, the first included, so that a template still rendering the
-- earlier document keeps registering devices (under the policy's name, whose default
-- version applies). Policies never replaced have no rows here.

ALTER TABLE policies ADD COLUMN default_version BIGINT NOT NULL DEFAULT 1;

CREATE TABLE policy_versions (
    policy_name TEXT COLLATE "C" NOT NULL REFERENCES policies (name),
    version_id  BIGINT NOT NULL,
    document    JSON   NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (policy_name, version_id)
);
