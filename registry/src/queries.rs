//! The read-only queries, written once for both backends: lookups by key, the filtered
//! listings (assembled with [`sqlx::QueryBuilder`]), counts, revoked certificates and
//! the latest CRL. JSON columns are read as `CAST(… AS TEXT)` (PostgreSQL stores
//! `jsonb`, SQLite text).

use crate::common::{self, cert_columns, connection_columns, rotation_columns};
use crate::dialect::{Dialect, Flows};
use crate::{
    CertificateFilter, CertificateRecord, ConnectionRecord, EventFilter, EventRecord,
    MAX_CONNECTIONS_PER_CERTIFICATE, PolicyRecord, RegistryCounts, RegistryError, RevokedEntry,
    RotationFilter, RotationRecord, StoredCrl, ThingFilter, ThingRecord,
};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, QueryBuilder, Type};

/// The thing columns, in the order [`common::thing_from_row`] reads them.
macro_rules! thing_columns {
    () => {
        "name, template, created_at, updated_at, thing_type, CAST(attributes AS TEXT), \
         CAST(groups AS TEXT), billing_group, version"
    };
}

pub(crate) const SQL_THING: &str =
    concat!("SELECT ", thing_columns!(), " FROM things WHERE name = $1");
pub(crate) const SQL_POLICY: &str = "SELECT name, CAST(document AS TEXT), created_at, updated_at \
     FROM policies WHERE name = $1";
const SQL_POLICIES: &str = "SELECT name, CAST(document AS TEXT), created_at, updated_at \
     FROM policies ORDER BY name";
/// The policies of a thing: attached to any of its active certificates, or to one of its
/// thing groups.
pub(crate) fn sql_policies_of_thing<R: Dialect>() -> String {
    format!(
        "SELECT name, CAST(document AS TEXT), created_at, updated_at \
         FROM policies WHERE name IN ( \
            SELECT a.policy_name FROM certificates c \
            JOIN policy_attachments a ON a.serial = c.serial \
            WHERE c.thing_name = $1 AND c.status = 'active' \
            UNION SELECT g.policy_name FROM things t \
            JOIN thing_group_policies g ON g.group_name IN ({}) \
            WHERE t.name = $1) \
         ORDER BY name",
        R::json_values_of("t.groups")
    )
}
pub(crate) const SQL_RECENT_CONNECTIONS: &str = concat!(
    "SELECT ",
    connection_columns!(),
    " FROM connections WHERE fingerprint_sha256 = $1 ORDER BY id DESC LIMIT $2"
);
/// Revoked certificates, claim certificates and certificates the Fleet Provisioning API
/// issued that were never registered.
const SQL_REVOKED_SERIALS: &str = "SELECT serial FROM certificates \
     WHERE status = 'revoked' AND not_after >= $1 \
     UNION ALL SELECT serial FROM claims WHERE status = 'revoked' AND not_after >= $1 \
     UNION ALL SELECT serial FROM provisional_certificates \
        WHERE state = 'revoked' AND not_after >= $1";
pub(crate) const SQL_ROTATION: &str = concat!(
    "SELECT ",
    rotation_columns!(),
    " FROM rotations WHERE old_serial = $1"
);
pub(crate) const SQL_REVOKED_ENTRIES: &str = "SELECT serial, thing_name, \
        COALESCE(revoked_at, created_at), revocation_reason, not_after \
     FROM certificates WHERE status = 'revoked' AND not_after >= $1 \
     UNION ALL SELECT serial, 'claim:' || name, COALESCE(revoked_at, created_at), \
        'cessationOfOperation', not_after \
     FROM claims WHERE status = 'revoked' AND not_after >= $1 \
     UNION ALL SELECT serial, COALESCE(thing_name, ''), COALESCE(finished_at, created_at), \
        'cessationOfOperation', not_after \
     FROM provisional_certificates WHERE state = 'revoked' AND not_after >= $1";
pub(crate) const SQL_LATEST_CRL: &str = "SELECT number, this_update, next_update, \
        entries_digest, entry_count, der FROM crls ORDER BY number DESC LIMIT 1";

/// A `SELECT` with optional `WHERE` conditions, an order and an optional limit.
struct Select<DB: Database> {
    query: QueryBuilder<DB>,
    conditions: usize,
}

impl<DB: Database> Select<DB> {
    /// `prefix` goes before the `SELECT` (`EXPLAIN QUERY PLAN ` in the plan tests).
    fn new(prefix: &str, base: &'static str) -> Self {
        let mut query = QueryBuilder::new(prefix);
        query.push(base);
        Select {
            query,
            conditions: 0,
        }
    }

    /// Adds `column op value` when `value` is set.
    fn filter<T>(mut self, column_op: &'static str, value: Option<T>) -> Self
    where
        T: for<'q> Encode<'q, DB> + Type<DB>,
    {
        if let Some(value) = value {
            self.query
                .push(if self.conditions == 0 {
                    " WHERE "
                } else {
                    " AND "
                })
                .push(column_op)
                .push(" ")
                .push_bind(value);
            self.conditions += 1;
        }
        self
    }

    /// Appends the order and the limit (none: every row).
    fn finish(mut self, order_by: &'static str, limit: Option<u32>) -> QueryBuilder<DB>
    where
        for<'q> i64: Encode<'q, DB> + Type<DB>,
    {
        self.query.push(" ORDER BY ").push(order_by);
        if let Some(limit) = common::limit_value(limit) {
            self.query.push(" LIMIT ").push_bind(limit);
        }
        self.query
    }
}

/// `list_things`: the statement and its binds, after `prefix`.
pub(crate) fn things_query<DB: Database>(prefix: &str, filter: &ThingFilter) -> QueryBuilder<DB>
where
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    Select::new(prefix, concat!("SELECT ", thing_columns!(), " FROM things"))
        .filter("name >", filter.after.clone())
        .finish("name", filter.limit)
}

/// `list_certificates`: the statement and its binds, after `prefix`.
pub(crate) fn certificates_query<DB: Database>(
    prefix: &str,
    filter: &CertificateFilter,
) -> QueryBuilder<DB>
where
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    Select::new(
        prefix,
        concat!("SELECT ", cert_columns!(), " FROM certificates"),
    )
    .filter("thing_name =", filter.thing_name.clone())
    .filter("status =", filter.status.map(|s| s.as_str().to_owned()))
    .filter("not_after <=", filter.expires_before)
    .finish("thing_name, created_at, serial", filter.limit)
}

/// `list_events`: the statement and its binds, after `prefix`.
pub(crate) fn events_query<DB: Database>(prefix: &str, filter: &EventFilter) -> QueryBuilder<DB>
where
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    Select::new(
        prefix,
        "SELECT id, at, kind, thing_name, serial, CAST(detail AS TEXT) FROM events",
    )
    .filter("thing_name =", filter.thing_name.clone())
    .filter("serial =", filter.serial.clone())
    .finish("id", filter.limit)
}

/// `list_rotations`: the statement and its binds, after `prefix`.
pub(crate) fn rotations_query<DB: Database>(
    prefix: &str,
    filter: &RotationFilter,
) -> QueryBuilder<DB>
where
    for<'q> String: Encode<'q, DB> + Type<DB>,
    for<'q> i64: Encode<'q, DB> + Type<DB>,
{
    Select::new(
        prefix,
        concat!("SELECT ", rotation_columns!(), " FROM rotations"),
    )
    .filter("state =", filter.state.map(|s| s.as_str().to_owned()))
    .filter("thing_name =", filter.thing_name.clone())
    .finish("due_at, old_serial", filter.limit)
}

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i32: Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Vec<u8>: Decode<'q, R::Db> + Type<R::Db>,
{
    /// Runs `query` and decodes every row with `decode`.
    pub(crate) async fn rows<T>(
        &self,
        context: &'static str,
        query: sqlx::query::Query<'_, R::Db, <R::Db as Database>::Arguments>,
        decode: impl Fn(&<R::Db as Database>::Row) -> sqlx::Result<T>,
    ) -> Result<Vec<T>, RegistryError> {
        let rows = query
            .fetch_all(self.0.pool())
            .await
            .map_err(|e| self.0.err(context, e))?;
        rows.iter()
            .map(decode)
            .collect::<Result<_, _>>()
            .map_err(|e| self.0.err(context, e))
    }

    pub(crate) async fn get_thing(&self, name: &str) -> Result<Option<ThingRecord>, RegistryError> {
        let q = sqlx::query(SQL_THING).bind(name.to_owned());
        Ok(self
            .rows("reading a thing", q, |r| common::thing_from_row(r))
            .await?
            .pop())
    }

    pub(crate) async fn list_things(
        &self,
        filter: &ThingFilter,
    ) -> Result<Vec<ThingRecord>, RegistryError> {
        let mut q = things_query("", filter);
        self.rows("listing things", q.build(), |r| common::thing_from_row(r))
            .await
    }

    pub(crate) async fn get_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<CertificateRecord>, RegistryError> {
        let q = sqlx::query(concat!(
            "SELECT ",
            cert_columns!(),
            " FROM certificates WHERE serial = $1"
        ))
        .bind(serial.to_owned());
        Ok(self
            .rows("reading a certificate", q, |r| common::cert_from_row(r))
            .await?
            .pop())
    }

    pub(crate) async fn list_certificates(
        &self,
        filter: &CertificateFilter,
    ) -> Result<Vec<CertificateRecord>, RegistryError> {
        let mut q = certificates_query("", filter);
        self.rows("listing certificates", q.build(), |r| {
            common::cert_from_row(r)
        })
        .await
    }

    pub(crate) async fn list_events(
        &self,
        filter: &EventFilter,
    ) -> Result<Vec<EventRecord>, RegistryError> {
        let mut q = events_query("", filter);
        self.rows("listing events", q.build(), |r| common::event_from_row(r))
            .await
    }

    pub(crate) async fn ping(&self) -> Result<(), RegistryError> {
        let _: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(self.0.pool())
            .await
            .map_err(|e| self.0.err("pinging the database", e))?;
        Ok(())
    }

    pub(crate) async fn counts(&self) -> Result<RegistryCounts, RegistryError> {
        // One snapshot, so the three numbers agree with each other.
        let mut tx = self
            .0
            .pool()
            .begin_with(R::BEGIN_SNAPSHOT)
            .await
            .map_err(|e| self.0.err("starting a transaction", e))?;
        let things: i64 = sqlx::query_scalar("SELECT count(*) FROM things")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.0.err("counting things", e))?;
        let by_status: Vec<(String, i64)> = sqlx::query_as(
            "SELECT status, count(*) FROM certificates GROUP BY status ORDER BY status",
        )
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| self.0.err("counting certificates", e))?;
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| self.0.err("counting events", e))?;
        let _ = tx.rollback().await;
        Ok(RegistryCounts {
            things: things as u64,
            certificates_by_status: by_status.into_iter().map(|(s, n)| (s, n as u64)).collect(),
            events: events as u64,
        })
    }

    pub(crate) async fn get_policy(
        &self,
        name: &str,
    ) -> Result<Option<PolicyRecord>, RegistryError> {
        let q = sqlx::query(SQL_POLICY).bind(name.to_owned());
        Ok(self
            .rows("reading a policy", q, |r| common::policy_from_row(r))
            .await?
            .pop())
    }

    pub(crate) async fn list_policies(&self) -> Result<Vec<PolicyRecord>, RegistryError> {
        let q = sqlx::query(SQL_POLICIES);
        self.rows("listing policies", q, |r| common::policy_from_row(r))
            .await
    }

    pub(crate) async fn policies_of_thing(
        &self,
        thing_name: &str,
    ) -> Result<Vec<PolicyRecord>, RegistryError> {
        let sql = sql_policies_of_thing::<R>();
        let q = sqlx::query(AssertSqlSafe(sql.as_str())).bind(thing_name.to_owned());
        self.rows("listing the policies of a thing", q, |r| {
            common::policy_from_row(r)
        })
        .await
    }

    pub(crate) async fn recent_connections(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Vec<ConnectionRecord>, RegistryError> {
        let q = sqlx::query(SQL_RECENT_CONNECTIONS)
            .bind(fingerprint_sha256.to_owned())
            .bind(MAX_CONNECTIONS_PER_CERTIFICATE as i64);
        self.rows("reading connections", q, |r| common::connection_from_row(r))
            .await
    }

    pub(crate) async fn revoked_serials(&self, now: i64) -> Result<Vec<String>, RegistryError> {
        // Sorted here: an ORDER BY over the union makes SQLite scan each table in serial
        // order instead of using the revoked-rows indexes.
        let mut serials: Vec<String> = sqlx::query_scalar(SQL_REVOKED_SERIALS)
            .bind(now)
            .fetch_all(self.0.pool())
            .await
            .map_err(|e| self.0.err("reading revoked certificates", e))?;
        serials.sort_unstable();
        Ok(serials)
    }

    pub(crate) async fn get_rotation(
        &self,
        old_serial: &str,
    ) -> Result<Option<RotationRecord>, RegistryError> {
        let q = sqlx::query(SQL_ROTATION).bind(old_serial.to_owned());
        Ok(self
            .rows("reading a rotation", q, |r| common::rotation_from_row(r))
            .await?
            .pop())
    }

    pub(crate) async fn list_rotations(
        &self,
        filter: &RotationFilter,
    ) -> Result<Vec<RotationRecord>, RegistryError> {
        let mut q = rotations_query("", filter);
        self.rows("listing rotations", q.build(), |r| {
            common::rotation_from_row(r)
        })
        .await
    }

    pub(crate) async fn revoked_entries(
        &self,
        now: i64,
    ) -> Result<Vec<RevokedEntry>, RegistryError> {
        let q = sqlx::query(SQL_REVOKED_ENTRIES).bind(now);
        let mut entries = self
            .rows("reading revoked certificates", q, |r| {
                common::revoked_entry_from_row(r)
            })
            .await?;
        // Sorted here, as `revoked_serials` is.
        entries.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
        Ok(entries)
    }

    pub(crate) async fn latest_crl(&self) -> Result<Option<StoredCrl>, RegistryError> {
        let q = sqlx::query(SQL_LATEST_CRL);
        Ok(self
            .rows("reading the latest CRL", q, |r| common::crl_from_row(r))
            .await?
            .pop())
    }
}
