-- fleetcert registry, PostgreSQL: connection records carry the session.
-- A device on MQTT (through the mosquitto plugin) is recorded when its session ends, with
-- its MQTT client id, connect and disconnect times and why it ended; the Device Defender
-- audit's DEVICE_CERTIFICATE_SHARED and CONFLICTING_CLIENT_IDS checks read them. HTTPS
-- connections keep `at` as the time they were answered and leave the new columns NULL.

ALTER TABLE connections ADD COLUMN transport TEXT NOT NULL DEFAULT 'https';
ALTER TABLE connections ADD COLUMN client_id TEXT COLLATE "C";
ALTER TABLE connections ADD COLUMN disconnected_at BIGINT;
ALTER TABLE connections ADD COLUMN disconnect_reason TEXT;

CREATE INDEX connections_client_id ON connections (client_id, at) WHERE client_id IS NOT NULL;
