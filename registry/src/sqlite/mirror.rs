//! The AWS mirror's settings and outbox (SQLite). The outbox is filled by the
//! `events_mirror` trigger (migration 0004) and by reconcile; this module claims,
//! finishes and reports operations.

use super::{SqliteRegistry, insert_events};
use crate::common::{
    self, EVENT_MIRROR_CA, EVENT_MIRROR_DISABLED, EVENT_MIRROR_ENABLED, EVENT_MIRROR_PARKED,
    MIRROR_OP_COLUMNS, MIRROR_SETTINGS_COLUMNS, NewEvent,
};
use crate::{
    MirrorBacklog, MirrorOp, MirrorOutcome, MirrorResult, MirrorSettings, MirroredCertificate,
    NewMirrorOp, PolicyRecord, RegistryError,
};
use sqlx::{AssertSqlSafe, Row};

/// Queues one operation unless its subject already has one of its kind waiting.
const SQL_QUEUE: &str = "INSERT INTO mirror_outbox (queue, kind, subject, state, created_at) \
     SELECT ?1, ?2, ?3, 'pending', ?4 \
     WHERE NOT EXISTS (SELECT 1 FROM mirror_outbox o WHERE o.subject = ?3 AND o.kind = ?2 \
                       AND o.state = 'pending' AND o.lease_owner IS NULL)";

/// Everything, for a newly enabled mirror: the CA, then each thing before its
/// certificates (ids follow the ORDER BY, so a thing's queue starts with the thing).
const SQL_BACKFILL: &str = "INSERT INTO mirror_outbox (queue, kind, subject, state, created_at) \
     SELECT queue, kind, subject, 'pending', ?1 FROM ( \
        SELECT 'ca' AS queue, 'ca' AS kind, 'ca' AS subject, 0 AS step, '' AS k \
        UNION ALL SELECT 'thing:' || name, 'thing', name, 1, name FROM things \
        UNION ALL SELECT 'thing:' || thing_name, 'certificate', serial, 2, serial \
            FROM certificates WHERE not_after > ?1) \
     ORDER BY step, k";

/// Heads of their queues that are free to run.
fn sql_claim() -> String {
    format!(
        "UPDATE mirror_outbox SET lease_owner = ?1, lease_until = ?2 WHERE id IN ( \
            SELECT o.id FROM mirror_outbox o \
            WHERE o.state = 'pending' AND (?5 OR o.not_before <= ?3) \
              AND (o.lease_until IS NULL OR o.lease_until <= ?3) \
              AND NOT EXISTS (SELECT 1 FROM mirror_outbox p \
                              WHERE p.queue = o.queue AND p.state = 'pending' AND p.id < o.id) \
            ORDER BY o.id LIMIT ?4) \
         RETURNING {MIRROR_OP_COLUMNS}"
    )
}

impl SqliteRegistry {
    pub(super) async fn policies_of_certificate_impl(
        &self,
        serial: &str,
    ) -> Result<Vec<PolicyRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT p.name, p.document, p.created_at, p.updated_at FROM policies p \
             JOIN policy_attachments a ON a.policy_name = p.name \
             WHERE a.serial = ?1 ORDER BY p.name",
        )
        .bind(serial)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err("listing the policies of a certificate", e))?;
        self.policies(&rows)
    }

    pub(super) async fn mirror_settings_impl(
        &self,
    ) -> Result<Option<MirrorSettings>, RegistryError> {
        let sql =
            format!("SELECT {MIRROR_SETTINGS_COLUMNS}, enabled FROM mirror_settings WHERE id = 1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.err("reading the mirror settings", e))?;
        row.map(|row| {
            let enabled: i64 = row.try_get(7)?;
            common::mirror_settings_from_row(&row, enabled != 0)
        })
        .transpose()
        .map_err(|e| self.err("reading the mirror settings", e))
    }

    pub(super) async fn enable_mirror_impl(
        &self,
        settings: &MirrorSettings,
        at: i64,
    ) -> Result<u64, RegistryError> {
        common::validate_mirror_settings(settings)?;
        let ctx = "enabling the mirror";
        let mut tx = self.begin().await?;
        let before: Option<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT enabled, region, endpoint_url FROM mirror_settings WHERE id = 1",
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(|e| self.err(ctx, e))?;
        let was_enabled = before.as_ref().map(|(enabled, _, _)| *enabled);
        if before.as_ref().is_some_and(|(_, region, endpoint)| {
            *region != settings.region || *endpoint != settings.endpoint_url
        }) {
            // Another account: the AWS certificate ids recorded mean nothing there.
            sqlx::query("DELETE FROM mirror_certificates")
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(ctx, e))?;
        }
        // A changed region or account keeps nothing: the CA is registered again.
        sqlx::query(
            "INSERT INTO mirror_settings (id, enabled, region, endpoint_url, ca_mode, \
                rotated_status, updated_at) VALUES (1, 1, ?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (id) DO UPDATE SET enabled = 1, \
                ca_certificate_id = CASE WHEN region = excluded.region \
                    AND endpoint_url IS excluded.endpoint_url THEN ca_certificate_id END, \
                arn_prefix = CASE WHEN region = excluded.region \
                    AND endpoint_url IS excluded.endpoint_url THEN arn_prefix END, \
                region = excluded.region, endpoint_url = excluded.endpoint_url, \
                ca_mode = excluded.ca_mode, rotated_status = excluded.rotated_status, \
                updated_at = excluded.updated_at",
        )
        .bind(&settings.region)
        .bind(settings.endpoint_url.as_deref())
        .bind(&settings.ca_mode)
        .bind(&settings.rotated_status)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(ctx, e))?;
        let queued = if was_enabled == Some(1) {
            0
        } else {
            sqlx::query(SQL_BACKFILL)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(ctx, e))?
                .rows_affected()
        };
        insert_events(
            &mut tx,
            &[NewEvent {
                at,
                kind: EVENT_MIRROR_ENABLED,
                thing_name: None,
                serial: None,
                detail: common::mirror_enabled_detail(settings, queued),
            }],
        )
        .await
        .map_err(|e| self.err(ctx, e))?;
        tx.commit().await.map_err(|e| self.err(ctx, e))?;
        Ok(queued)
    }

    pub(super) async fn disable_mirror_impl(&self, at: i64) -> Result<bool, RegistryError> {
        let ctx = "disabling the mirror";
        let mut tx = self.begin().await?;
        let changed = sqlx::query(
            "UPDATE mirror_settings SET enabled = 0, updated_at = ?1 WHERE id = 1 AND enabled = 1",
        )
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(ctx, e))?
        .rows_affected()
            > 0;
        if changed {
            insert_events(
                &mut tx,
                &[NewEvent {
                    at,
                    kind: EVENT_MIRROR_DISABLED,
                    thing_name: None,
                    serial: None,
                    detail: "{}".to_owned(),
                }],
            )
            .await
            .map_err(|e| self.err(ctx, e))?;
        }
        tx.commit().await.map_err(|e| self.err(ctx, e))?;
        Ok(changed)
    }

    pub(super) async fn record_mirror_ca_impl(
        &self,
        ca_certificate_id: &str,
        arn_prefix: &str,
        at: i64,
    ) -> Result<(), RegistryError> {
        let ctx = "recording the mirrored CA";
        let mut tx = self.begin().await?;
        let changed = sqlx::query(
            "UPDATE mirror_settings SET ca_certificate_id = ?1, arn_prefix = ?2, updated_at = ?3 \
             WHERE id = 1 AND (ca_certificate_id IS NOT ?1 OR arn_prefix IS NOT ?2)",
        )
        .bind(ca_certificate_id)
        .bind(arn_prefix)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(ctx, e))?
        .rows_affected();
        if changed > 0 {
            insert_events(
                &mut tx,
                &[NewEvent {
                    at,
                    kind: EVENT_MIRROR_CA,
                    thing_name: None,
                    serial: None,
                    detail: common::to_json(&serde_json::json!({
                        "ca_certificate_id": ca_certificate_id,
                        "arn_prefix": arn_prefix,
                    })),
                }],
            )
            .await
            .map_err(|e| self.err(ctx, e))?;
        }
        tx.commit().await.map_err(|e| self.err(ctx, e))
    }

    pub(super) async fn record_mirrored_certificate_impl(
        &self,
        certificate: &MirroredCertificate,
    ) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO mirror_certificates (serial, certificate_id, certificate_arn, recorded_at) \
             VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (serial) DO UPDATE SET certificate_id = excluded.certificate_id, \
                certificate_arn = excluded.certificate_arn, recorded_at = excluded.recorded_at",
        )
        .bind(&certificate.serial)
        .bind(&certificate.certificate_id)
        .bind(&certificate.certificate_arn)
        .bind(certificate.recorded_at)
        .execute(&self.pool)
        .await
        .map_err(|e| self.err("recording a mirrored certificate's AWS id", e))?;
        Ok(())
    }

    pub(super) async fn mirrored_certificate_impl(
        &self,
        serial: &str,
    ) -> Result<Option<MirroredCertificate>, RegistryError> {
        let row: Option<(String, String, String, i64)> = sqlx::query_as(
            "SELECT serial, certificate_id, certificate_arn, recorded_at \
             FROM mirror_certificates WHERE serial = ?1",
        )
        .bind(serial)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err("reading a mirrored certificate's AWS id", e))?;
        Ok(row.map(mirrored))
    }

    pub(super) async fn mirrored_certificates_impl(
        &self,
    ) -> Result<Vec<MirroredCertificate>, RegistryError> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT serial, certificate_id, certificate_arn, recorded_at \
             FROM mirror_certificates ORDER BY serial",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err("reading the mirrored certificates' AWS ids", e))?;
        Ok(rows.into_iter().map(mirrored).collect())
    }

    pub(super) async fn queue_mirror_ops_impl(
        &self,
        ops: &[NewMirrorOp],
        at: i64,
    ) -> Result<u64, RegistryError> {
        if ops.is_empty() {
            return Ok(0);
        }
        let ctx = "queueing mirror operations";
        let mut tx = self.begin().await?;
        let mut queued = 0;
        for op in ops {
            queued += sqlx::query(SQL_QUEUE)
                .bind(&op.queue)
                .bind(op.kind.as_str())
                .bind(&op.subject)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(ctx, e))?
                .rows_affected();
        }
        tx.commit().await.map_err(|e| self.err(ctx, e))?;
        Ok(queued)
    }

    pub(super) async fn claim_mirror_ops_impl(
        &self,
        owner: &str,
        now: i64,
        lease_secs: i64,
        limit: u32,
        ignore_backoff: bool,
    ) -> Result<Vec<MirrorOp>, RegistryError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let ctx = "claiming mirror operations";
        let mut tx = self.begin().await?;
        let rows = sqlx::query(AssertSqlSafe(sql_claim()))
            .bind(owner)
            .bind(now.saturating_add(lease_secs))
            .bind(now)
            .bind(i64::from(limit))
            .bind(ignore_backoff)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.err(ctx, e))?;
        let mut ops = rows
            .iter()
            .map(common::mirror_op_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.err(ctx, e))?;
        tx.commit().await.map_err(|e| self.err(ctx, e))?;
        ops.sort_unstable_by_key(|op| op.id);
        Ok(ops)
    }

    pub(super) async fn finish_mirror_ops_impl(
        &self,
        owner: &str,
        results: &[MirrorResult],
        at: i64,
    ) -> Result<u64, RegistryError> {
        if results.is_empty() {
            return Ok(0);
        }
        let ctx = "finishing mirror operations";
        let mut tx = self.begin().await?;
        let mut recorded = 0;
        let mut events = Vec::new();
        for result in results {
            let done = match &result.outcome {
                MirrorOutcome::Applied => {
                    sqlx::query("DELETE FROM mirror_outbox WHERE id = ?1 AND lease_owner = ?2")
                        .bind(result.id)
                        .bind(owner)
                        .execute(&mut *tx)
                        .await
                }
                MirrorOutcome::Retry { error, not_before } => {
                    sqlx::query(
                        "UPDATE mirror_outbox SET attempts = attempts + 1, last_error = ?3, \
                            not_before = ?4, lease_owner = NULL, lease_until = NULL \
                         WHERE id = ?1 AND lease_owner = ?2",
                    )
                    .bind(result.id)
                    .bind(owner)
                    .bind(error)
                    .bind(*not_before)
                    .execute(&mut *tx)
                    .await
                }
                MirrorOutcome::Park { error } => {
                    let parked: Option<(String, String, String)> = sqlx::query_as(
                        "UPDATE mirror_outbox SET state = 'parked', attempts = attempts + 1, \
                            last_error = ?3, lease_owner = NULL, lease_until = NULL \
                         WHERE id = ?1 AND lease_owner = ?2 RETURNING kind, subject, queue",
                    )
                    .bind(result.id)
                    .bind(owner)
                    .bind(error)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| self.err(ctx, e))?;
                    if let Some((kind, subject, queue)) = parked {
                        recorded += 1;
                        events.push(NewEvent {
                            at,
                            kind: EVENT_MIRROR_PARKED,
                            thing_name: queue.strip_prefix("thing:").map(str::to_owned),
                            serial: (kind == "certificate").then(|| subject.clone()),
                            detail: common::mirror_parked_detail(result.id, &kind, &subject, error),
                        });
                    }
                    continue;
                }
            };
            recorded += done.map_err(|e| self.err(ctx, e))?.rows_affected();
        }
        insert_events(&mut tx, &events)
            .await
            .map_err(|e| self.err(ctx, e))?;
        tx.commit().await.map_err(|e| self.err(ctx, e))?;
        Ok(recorded)
    }

    pub(super) async fn mirror_backlog_impl(
        &self,
        parked_limit: u32,
    ) -> Result<MirrorBacklog, RegistryError> {
        let ctx = "reading the mirror backlog";
        let (pending, retrying, in_flight, parked): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT COALESCE(SUM(state = 'pending'), 0), \
                    COALESCE(SUM(state = 'pending' AND attempts > 0), 0), \
                    COALESCE(SUM(state = 'pending' AND lease_owner IS NOT NULL), 0), \
                    COALESCE(SUM(state = 'parked'), 0) FROM mirror_outbox",
        )
        .fetch_one(&self.pool)
        .await
        .map_err(|e| self.err(ctx, e))?;
        let oldest = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MIRROR_OP_COLUMNS} FROM mirror_outbox WHERE state = 'pending' \
             ORDER BY id LIMIT 1"
        )))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| self.err(ctx, e))?;
        let parked_rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MIRROR_OP_COLUMNS} FROM mirror_outbox WHERE state = 'parked' \
             ORDER BY id LIMIT ?1"
        )))
        .bind(i64::from(parked_limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| self.err(ctx, e))?;
        Ok(MirrorBacklog {
            pending,
            retrying,
            in_flight,
            oldest_pending: oldest
                .as_ref()
                .map(common::mirror_op_from_row)
                .transpose()
                .map_err(|e| self.err(ctx, e))?,
            parked,
            parked_ops: parked_rows
                .iter()
                .map(common::mirror_op_from_row)
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(ctx, e))?,
        })
    }

    pub(super) async fn requeue_parked_mirror_ops_impl(
        &self,
        _at: i64,
    ) -> Result<u64, RegistryError> {
        let ctx = "re-queueing parked mirror operations";
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE mirror_outbox SET state = 'pending', attempts = 0, not_before = 0 \
             WHERE state = 'parked'",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.err(ctx, e))?
        .rows_affected();
        tx.commit().await.map_err(|e| self.err(ctx, e))?;
        Ok(n)
    }
}

fn mirrored(
    (serial, certificate_id, certificate_arn, recorded_at): (String, String, String, i64),
) -> MirroredCertificate {
    MirroredCertificate {
        serial,
        certificate_id,
        certificate_arn,
        recorded_at,
    }
}
