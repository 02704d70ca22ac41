//! Returning devices, written once for both backends: the device state read on every
//! returning connection, the connection log (appended in flushes, pruned per
//! certificate) and the write probe behind `/healthz`.
//!
//! The device state is one statement of primary-key and unique-index lookups only (the
//! certificate by fingerprint, its thing, its rotation as the old certificate, its
//! attached policies, the certificate it replaces). The backends differ only in how the
//! attached policies are aggregated into a JSON array, so each instantiates
//! [`device_state_sql!`] with its aggregate as [`Dialect::SQL_DEVICE_STATE`]: a constant,
//! nothing is assembled on the hot path.
//!
//! Connection flushes serialise on an advisory lock on PostgreSQL
//! ([`CONNECTIONS_LOCK`]; SQLite writers hold the whole database), so pruning each
//! certificate to its newest [`MAX_CONNECTIONS_PER_CERTIFICATE`] is exact; a flush that
//! loses a deadlock or serialisation race is retried ([`write_tx!`]).

use crate::common::{self, to_json};
use crate::dialect::{Dialect, Flows, insert_rows, step, write_tx};
use crate::{ConnectionRecord, DeviceState, MAX_CONNECTIONS_PER_CERTIFICATE, RegistryError};
use sqlx::{ColumnIndex, Database, Decode, Encode, Executor, Type};

/// The advisory lock that serialises connection flushes, so that pruning to the newest
/// [`MAX_CONNECTIONS_PER_CERTIFICATE`] is exact ("fleetcon").
const CONNECTIONS_LOCK: i64 = 0x666c_6565_7463_6f6e;

/// A certificate, its thing, its policies — attached to it or to one of its thing's
/// groups (`$policies`: an aggregate over rows `attached` yielding a JSON array of
/// `a.policy_name`, in any order; `$groups`: the names in `t.groups`) — whether
/// its first use confirms a rotation (it replaces a certificate not revoked yet), and its
/// own rotation (as the old certificate) if any, by fingerprint (`$1`): the hot path of
/// every returning connection. Columns: [`common::cert_columns!`], the thing's (as
/// [`common::thing_from_row_at`] reads them), the policies, the flag,
/// [`common::rotation_columns!`].
macro_rules! device_state_sql {
    ($policies:literal, $groups:literal) => {
        concat!(
            "SELECT ",
            $crate::common::cert_columns!(c),
            ", t.name, t.template, t.created_at, t.updated_at, t.thing_type, \
               CAST(t.attributes AS TEXT), CAST(t.groups AS TEXT), t.billing_group, t.version, \
               (SELECT ",
            $policies,
            " FROM (SELECT p.policy_name FROM policy_attachments p WHERE p.serial = c.serial \
               UNION SELECT g.policy_name FROM thing_group_policies g WHERE g.group_name IN (",
            $groups,
            ")) AS attached), \
               EXISTS (SELECT 1 FROM certificates o \
                WHERE o.serial = c.replaces AND o.status <> 'revoked'), ",
            $crate::common::rotation_columns!(r),
            " FROM certificates c JOIN things t ON t.name = c.thing_name \
             LEFT JOIN rotations r ON r.old_serial = c.serial \
             WHERE c.fingerprint_sha256 = $1"
        )
    };
}
pub(crate) use device_state_sql;

/// The connection insert (rows appended by [`insert_rows`]).
const INSERT_CONNECTIONS: &str = "INSERT INTO connections (fingerprint_sha256, thing_name, \
     client_addr, at, transport, client_id, disconnected_at, disconnect_reason)";

/// Deletes all but the newest `$2 + 1` connections of each fingerprint of `$1` (a JSON
/// array): one cutoff id per fingerprint (materialised), then a range delete through the
/// `connections_fingerprint_id` index.
pub(crate) fn sql_prune_connections<R: Dialect>() -> String {
    format!(
        "WITH cutoff AS MATERIALIZED ( \
            SELECT f.value AS fp, \
               (SELECT k.id FROM connections k WHERE k.fingerprint_sha256 = f.value \
                ORDER BY k.id DESC LIMIT 1 OFFSET $2) AS id \
            FROM ({}) AS f) \
         DELETE FROM connections WHERE id IN ( \
            SELECT c.id FROM cutoff \
            JOIN connections c ON c.fingerprint_sha256 = cutoff.fp AND c.id < cutoff.id)",
        R::json_values(1)
    )
}

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> &'q str: Encode<'q, R::Db> + Type<R::Db>,
    for<'q> Option<&'q str>: Encode<'q, R::Db>,
    for<'q> Option<i64>: Encode<'q, R::Db>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i32: Decode<'q, R::Db> + Type<R::Db>,
    for<'q> bool: Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Vec<u8>: Decode<'q, R::Db> + Type<R::Db>,
{
    pub(crate) async fn device_state(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Option<DeviceState>, RegistryError> {
        let row = sqlx::query(R::SQL_DEVICE_STATE)
            .bind(fingerprint_sha256)
            .fetch_optional(self.0.pool())
            .await
            .map_err(|e| self.0.err("reading a device", e))?;
        let Some(row) = row else { return Ok(None) };
        let decode = |row: &<R::Db as Database>::Row| -> sqlx::Result<DeviceState> {
            use sqlx::Row;
            let policies: String = row.try_get(common::CERT_COLUMN_COUNT + 9)?;
            let mut policies: Vec<String> = common::parse_json(&policies)?;
            policies.sort();
            let at = common::CERT_COLUMN_COUNT + 10;
            Ok(DeviceState {
                certificate: common::cert_from_row(row)?,
                thing: common::thing_from_row_at(row, common::CERT_COLUMN_COUNT)?,
                policies,
                confirms_rotation: row.try_get(at)?,
                rotation: common::optional_rotation_at(row, at + 1)?,
            })
        };
        decode(&row)
            .map(Some)
            .map_err(|e| self.0.err("reading a device", e))
    }

    pub(crate) async fn record_connections(
        &self,
        connections: &[ConnectionRecord],
    ) -> Result<(), RegistryError> {
        let (keep, fingerprints) = common::connections_to_keep(connections);
        if keep.is_empty() {
            return Ok(());
        }
        let fingerprints = to_json(&fingerprints);
        write_tx!(self, "a connection flush", |tx| {
            R::lock_for_transaction(&mut *tx, CONNECTIONS_LOCK)
                .await
                .map_err(step("locking connections"))?;
            insert_rows(&mut *tx, INSERT_CONNECTIONS, 8, "", &keep, |row, c| {
                row.push_bind(c.fingerprint_sha256.as_str())
                    .push_bind(c.thing_name.as_str())
                    .push_bind(c.client_addr.as_str())
                    .push_bind(c.at)
                    .push_bind(c.transport.as_str())
                    .push_bind(c.client_id.as_deref())
                    .push_bind(c.disconnected_at)
                    .push_bind(c.disconnect_reason.as_deref());
            })
            .await
            .map_err(step("recording connections"))?;
            sqlx::query(sqlx::AssertSqlSafe(sql_prune_connections::<R>()))
                .bind(fingerprints.as_str())
                .bind(MAX_CONNECTIONS_PER_CERTIFICATE as i64 - 1)
                .execute(&mut *tx)
                .await
                .map_err(step("pruning connections"))?;
            Ok(())
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    /// [`crate::Registry::probe_writes`], through the backend's [`common::ProbeGate`]
    /// (a recent success is reused): a transaction of the kind a registration takes
    /// ([`Dialect::begin_write`]) that writes ([`Dialect::probe_write`]) and commits.
    pub(crate) async fn probe_writes(&self) -> Result<(), RegistryError> {
        self.0
            .probe_gate()
            .run(async {
                let mut tx = self.0.begin_write().await?;
                R::probe_write(&mut tx)
                    .await
                    .map_err(|e| self.0.err("probing writes", e))?;
                tx.commit()
                    .await
                    .map_err(|e| self.0.err("committing a write probe", e))
            })
            .await
    }
}
