//! The Device Defender audit's storage, written once for both backends: audit tasks with
//! their findings (one transaction each), suppressions, and the MQTT sessions the
//! connection-based checks read.

use crate::common::{self, NewEvent, connection_columns, to_json};
use crate::dialect::{Dialect, Flows, step, write_tx};
use crate::{
    AuditFindingFilter, AuditFindingRecord, AuditSuppression, AuditTaskRecord, AuditedCertificate,
    CertStatus, ConnectionRecord, RegistryError,
};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Row, Type};

const EVENT_AUDIT_COMPLETED: &str = "audit.completed";
/// Findings inserted by one statement.
const FINDINGS_PER_STATEMENT: usize = 1000;
const EVENT_SUPPRESSION_SET: &str = "audit.suppression_set";
const EVENT_SUPPRESSION_DELETED: &str = "audit.suppression_deleted";

const TASK_COLUMNS: &str =
    "SELECT task_id, task_type, task_status, started_at, finished_at, summary FROM audit_tasks";
const FINDING_COLUMNS: &str = "SELECT finding_id, task_id, check_name, severity, reason_code, \
     reason_description, resource_type, resource_id, detail, suppressed, found_at \
     FROM audit_findings";
const SUPPRESSION_COLUMNS: &str =
    "SELECT check_name, resource_id, expires_at, description, created_at FROM audit_suppressions";

fn json_of(text: &str) -> sqlx::Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn task_from_row<'r, W>(row: &'r W) -> sqlx::Result<AuditTaskRecord>
where
    W: Row,
    usize: ColumnIndex<W>,
    String: Decode<'r, W::Database> + Type<W::Database>,
    i64: Decode<'r, W::Database> + Type<W::Database>,
{
    let summary: String = row.try_get(5)?;
    Ok(AuditTaskRecord {
        task_id: row.try_get(0)?,
        task_type: row.try_get(1)?,
        task_status: row.try_get(2)?,
        started_at: row.try_get(3)?,
        finished_at: row.try_get(4)?,
        summary: json_of(&summary)?,
    })
}

fn finding_from_row<'r, W>(row: &'r W) -> sqlx::Result<AuditFindingRecord>
where
    W: Row,
    usize: ColumnIndex<W>,
    String: Decode<'r, W::Database> + Type<W::Database>,
    i64: Decode<'r, W::Database> + Type<W::Database>,
{
    let detail: String = row.try_get(8)?;
    let suppressed: i64 = row.try_get(9)?;
    Ok(AuditFindingRecord {
        finding_id: row.try_get(0)?,
        task_id: row.try_get(1)?,
        check_name: row.try_get(2)?,
        severity: row.try_get(3)?,
        reason_code: row.try_get(4)?,
        reason_description: row.try_get(5)?,
        resource_type: row.try_get(6)?,
        resource_id: row.try_get(7)?,
        detail: json_of(&detail)?,
        suppressed: suppressed != 0,
        found_at: row.try_get(10)?,
    })
}

fn suppression_from_row<'r, W>(row: &'r W) -> sqlx::Result<AuditSuppression>
where
    W: Row,
    usize: ColumnIndex<W>,
    String: Decode<'r, W::Database> + Type<W::Database>,
    i64: Decode<'r, W::Database> + Type<W::Database>,
    Option<i64>: Decode<'r, W::Database> + Type<W::Database>,
{
    Ok(AuditSuppression {
        check_name: row.try_get(0)?,
        resource_id: row.try_get(1)?,
        expires_at: row.try_get(2)?,
        description: row.try_get(3)?,
        created_at: row.try_get(4)?,
    })
}

fn event(at: i64, kind: &'static str, detail: serde_json::Value) -> NewEvent {
    NewEvent {
        at,
        kind,
        thing_name: None,
        serial: None,
        detail: to_json(&detail),
    }
}

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Option<String>: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Option<i64>: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i32: Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Vec<u8>: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
{
    pub(crate) async fn record_audit(
        &self,
        task: &AuditTaskRecord,
        findings: &[AuditFindingRecord],
    ) -> Result<(), RegistryError> {
        write_tx!(self, "recording an audit", |tx| {
            sqlx::query(
                "INSERT INTO audit_tasks (task_id, task_type, task_status, started_at, \
                    finished_at, summary) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(task.task_id.clone())
            .bind(task.task_type.clone())
            .bind(task.task_status.clone())
            .bind(task.started_at)
            .bind(task.finished_at)
            .bind(to_json(&task.summary))
            .execute(&mut *tx)
            .await
            .map_err(step("recording the audit task"))?;
            // Many rows per statement: a fleet's audit can find thousands of resources,
            // and each statement is a round trip to the database.
            let insert = format!(
                "INSERT INTO audit_findings (finding_id, task_id, check_name, severity, \
                    reason_code, reason_description, resource_type, resource_id, detail, \
                    suppressed, found_at) \
                 SELECT value ->> 0, $2, value ->> 1, value ->> 2, value ->> 3, value ->> 4, \
                    value ->> 5, value ->> 6, {}, CAST(value ->> 8 AS BIGINT), \
                    CAST(value ->> 9 AS BIGINT) FROM {}",
                R::json_column("value ->> 7"),
                R::json_rows(1)
            );
            for chunk in findings.chunks(FINDINGS_PER_STATEMENT) {
                let rows: Vec<serde_json::Value> = chunk
                    .iter()
                    .map(|f| {
                        serde_json::json!([
                            f.finding_id,
                            f.check_name,
                            f.severity,
                            f.reason_code,
                            f.reason_description,
                            f.resource_type,
                            f.resource_id,
                            to_json(&f.detail),
                            i64::from(f.suppressed),
                            f.found_at,
                        ])
                    })
                    .collect();
                sqlx::query(AssertSqlSafe(insert.as_str()))
                    .bind(to_json(&rows))
                    .bind(task.task_id.clone())
                    .execute(&mut *tx)
                    .await
                    .map_err(step("recording audit findings"))?;
            }
            R::insert_events(
                &mut tx,
                &[event(
                    task.finished_at,
                    EVENT_AUDIT_COMPLETED,
                    serde_json::json!({
                        "task_id": task.task_id,
                        "task_type": task.task_type,
                        "non_compliant_checks": task.summary["nonCompliantChecksCount"],
                        "findings": findings.len(),
                    }),
                )],
            )
            .await
            .map_err(step("appending events"))?;
            Ok(())
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    pub(crate) async fn audit_tasks(
        &self,
        limit: u32,
    ) -> Result<Vec<AuditTaskRecord>, RegistryError> {
        let sql = format!("{TASK_COLUMNS} ORDER BY started_at DESC, task_id LIMIT $1");
        let q = sqlx::query(AssertSqlSafe(sql)).bind(i64::from(limit));
        self.rows("reading audit tasks", q, |r| task_from_row(r))
            .await
    }

    pub(crate) async fn audit_task(
        &self,
        task_id: &str,
    ) -> Result<Option<AuditTaskRecord>, RegistryError> {
        let sql = format!("{TASK_COLUMNS} WHERE task_id = $1");
        let q = sqlx::query(AssertSqlSafe(sql)).bind(task_id.to_owned());
        Ok(self
            .rows("reading an audit task", q, |r| task_from_row(r))
            .await?
            .pop())
    }

    pub(crate) async fn audit_findings(
        &self,
        filter: &AuditFindingFilter,
    ) -> Result<Vec<AuditFindingRecord>, RegistryError> {
        let mut sql = format!("{FINDING_COLUMNS} WHERE 1 = 1");
        let mut values = Vec::new();
        for (column, value) in [
            ("task_id", &filter.task_id),
            ("check_name", &filter.check_name),
            ("resource_id", &filter.resource_id),
        ] {
            if let Some(value) = value {
                values.push(value.clone());
                sql.push_str(&format!(" AND {column} = ${}", values.len()));
            }
        }
        sql.push_str(&format!(
            " ORDER BY found_at DESC, check_name, resource_id LIMIT ${}",
            values.len() + 1
        ));
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for value in values {
            q = q.bind(value);
        }
        q = q.bind(i64::from(filter.limit));
        self.rows("reading audit findings", q, |r| finding_from_row(r))
            .await
    }

    pub(crate) async fn put_audit_suppression(
        &self,
        s: &AuditSuppression,
    ) -> Result<(), RegistryError> {
        write_tx!(self, "recording an audit suppression", |tx| {
            sqlx::query(
                "INSERT INTO audit_suppressions (check_name, resource_id, expires_at, \
                    description, created_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (check_name, resource_id) DO UPDATE SET \
                    expires_at = excluded.expires_at, description = excluded.description, \
                    created_at = excluded.created_at",
            )
            .bind(s.check_name.clone())
            .bind(s.resource_id.clone())
            .bind(s.expires_at)
            .bind(s.description.clone())
            .bind(s.created_at)
            .execute(&mut *tx)
            .await
            .map_err(step("recording an audit suppression"))?;
            R::insert_events(
                &mut tx,
                &[event(
                    s.created_at,
                    EVENT_SUPPRESSION_SET,
                    serde_json::json!({
                        "check": s.check_name, "resource": s.resource_id,
                        "expires_at": s.expires_at, "description": s.description,
                    }),
                )],
            )
            .await
            .map_err(step("appending events"))?;
            Ok(())
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    pub(crate) async fn delete_audit_suppression(
        &self,
        check_name: &str,
        resource_id: &str,
        at: i64,
    ) -> Result<bool, RegistryError> {
        write_tx!(self, "deleting an audit suppression", |tx| {
            let deleted = sqlx::query(
                "DELETE FROM audit_suppressions WHERE check_name = $1 AND resource_id = $2 \
                 RETURNING check_name",
            )
            .bind(check_name.to_owned())
            .bind(resource_id.to_owned())
            .fetch_optional(&mut *tx)
            .await
            .map_err(step("deleting an audit suppression"))?
            .is_some();
            if deleted {
                R::insert_events(
                    &mut tx,
                    &[event(
                        at,
                        EVENT_SUPPRESSION_DELETED,
                        serde_json::json!({ "check": check_name, "resource": resource_id }),
                    )],
                )
                .await
                .map_err(step("appending events"))?;
            }
            Ok(deleted)
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    pub(crate) async fn audit_suppressions(&self) -> Result<Vec<AuditSuppression>, RegistryError> {
        let sql = format!("{SUPPRESSION_COLUMNS} ORDER BY check_name, resource_id");
        self.rows(
            "reading audit suppressions",
            sqlx::query(AssertSqlSafe(sql)),
            |r| suppression_from_row(r),
        )
        .await
    }

    pub(crate) async fn audited_certificates(
        &self,
    ) -> Result<Vec<AuditedCertificate>, RegistryError> {
        // One pass in the table's own order (SQLite: by rowid, sequential; ordering by
        // serial walks the table at random), each row decoded as it streams in, so a
        // fleet's worth of database rows is never held at once; sorted by serial here.
        use futures_util::TryStreamExt;
        let decode = |row: &<R::Db as Database>::Row| -> sqlx::Result<AuditedCertificate> {
            let status: String = row.try_get(3)?;
            Ok(AuditedCertificate {
                serial: row.try_get(0)?,
                fingerprint_sha256: row.try_get(1)?,
                thing_name: row.try_get(2)?,
                status: status.parse::<CertStatus>().map_err(common::decode_error)?,
                key_algorithm: row.try_get(4)?,
                not_before: row.try_get(5)?,
                not_after: row.try_get(6)?,
            })
        };
        let read = async {
            let mut all = Vec::new();
            let mut rows = sqlx::query(
                "SELECT serial, fingerprint_sha256, thing_name, status, key_algorithm, \
                    not_before, not_after FROM certificates",
            )
            .fetch(self.0.pool());
            while let Some(row) = rows.try_next().await? {
                all.push(decode(&row)?);
            }
            Ok::<_, sqlx::Error>(all)
        };
        let mut all = read
            .await
            .map_err(|e| self.0.err("reading certificates", e))?;
        all.sort_unstable_by(|a, b| a.serial.cmp(&b.serial));
        Ok(all)
    }

    pub(crate) async fn mqtt_sessions(
        &self,
        since: i64,
        until: i64,
    ) -> Result<Vec<ConnectionRecord>, RegistryError> {
        let sql = concat!(
            "SELECT ",
            connection_columns!(),
            " FROM connections WHERE client_id IS NOT NULL AND at >= $1 AND at < $2 ORDER BY at, id"
        );
        let q = sqlx::query(sql).bind(since).bind(until);
        self.rows("reading MQTT sessions", q, |r| {
            common::connection_from_row(r)
        })
        .await
    }
}
