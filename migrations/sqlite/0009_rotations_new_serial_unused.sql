-- fleetcert registry, SQLite: drop an index no query uses. Rotations are read by their old
-- certificate (the primary key); a replacement is found from `certificates.replaces`.
-- Each completed rotation wrote a random key into it (issue 17: the sweep's commit is
-- bound by random-key index maintenance).
-- Runs inside the migrator's BEGIN IMMEDIATE transaction: no BEGIN/COMMIT here.

DROP INDEX rotations_new_serial;
