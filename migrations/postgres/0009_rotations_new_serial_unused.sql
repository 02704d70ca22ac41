-- fleetcert registry, PostgreSQL: drop an index no query uses. Rotations are read by
-- their old certificate (the primary key); a replacement is found from
-- `certificates.replaces`. Each completed rotation wrote a random key into it.

DROP INDEX rotations_new_serial;
