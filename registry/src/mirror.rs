//! The AWS mirror's settings and outbox, written once for both backends. The outbox is filled by the
//! `events_mirror` trigger (migration 0004) and by reconcile; this module claims,
//! finishes and reports operations.

use crate::common::{
    self, EVENT_MIRROR_CA, EVENT_MIRROR_DISABLED, EVENT_MIRROR_ENABLED, EVENT_MIRROR_PARKED,
    MIRROR_OP_COLUMNS, MIRROR_SETTINGS_COLUMNS, NewEvent,
};
use crate::dialect::{Dialect, Flows, RowsAffected};
use crate::{
    MirrorBacklog, MirrorOp, MirrorOutcome, MirrorResult, MirrorSettings, MirroredCertificate,
    NewMirrorOp, PolicyRecord, RegistryError,
};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Row, Type};

/// Queues one operation unless its subject already has one of its kind waiting.
const SQL_QUEUE: &str = "INSERT INTO mirror_outbox (queue, kind, subject, state, created_at) \
     SELECT $1, $2, $3, 'pending', $4 \
     WHERE NOT EXISTS (SELECT 1 FROM mirror_outbox o WHERE o.subject = $3 AND o.kind = $2 \
                       AND o.state = 'pending' AND o.lease_owner IS NULL)";

/// Everything, for a newly enabled mirror: the CA, then each thing before its
/// certificates (ids follow the ORDER BY, so a thing's queue starts with the thing).
const SQL_BACKFILL: &str = "INSERT INTO mirror_outbox (queue, kind, subject, state, created_at) \
     SELECT queue, kind, subject, 'pending', $1 FROM ( \
        SELECT CAST('ca' AS TEXT) AS queue, 'ca' AS kind, 'ca' AS subject, 0 AS step, '' AS k \
        UNION ALL SELECT 'thing:' || name, 'thing', name, 1, name FROM things \
        UNION ALL SELECT 'thing:' || thing_name, 'certificate', serial, 2, serial \
            FROM certificates WHERE not_after > $1) AS everything \
     ORDER BY step, k";

/// Heads of their queues that are free to run.
fn sql_claim(skip_locked: &str) -> String {
    format!(
        "UPDATE mirror_outbox SET lease_owner = $1, lease_until = $2 WHERE id IN ( \
            SELECT o.id FROM mirror_outbox o \
            WHERE o.state = 'pending' AND ($5 OR o.not_before <= $3) \
              AND (o.lease_until IS NULL OR o.lease_until <= $3) \
              AND NOT EXISTS (SELECT 1 FROM mirror_outbox p \
                              WHERE p.queue = o.queue AND p.state = 'pending' AND p.id < o.id) \
            ORDER BY o.id LIMIT $4{skip_locked}) \
         RETURNING {MIRROR_OP_COLUMNS}"
    )
}

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> Option<String>: Encode<'q, R::Db>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> bool: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
{
    pub(crate) async fn policies_of_certificate(
        &self,
        serial: &str,
    ) -> Result<Vec<PolicyRecord>, RegistryError> {
        let rows = sqlx::query(
            "SELECT p.name, CAST(p.document AS TEXT), p.created_at, p.updated_at FROM policies p \
             JOIN policy_attachments a ON a.policy_name = p.name \
             WHERE a.serial = $1 ORDER BY p.name",
        )
        .bind(serial.to_owned())
        .fetch_all(self.0.pool())
        .await
        .map_err(|e| self.0.err("listing the policies of a certificate", e))?;
        rows.iter()
            .map(common::policy_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.0.err("reading policies", e))
    }

    pub(crate) async fn mirror_settings(&self) -> Result<Option<MirrorSettings>, RegistryError> {
        let sql =
            format!("SELECT {MIRROR_SETTINGS_COLUMNS}, enabled FROM mirror_settings WHERE id = 1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .fetch_optional(self.0.pool())
            .await
            .map_err(|e| self.0.err("reading the mirror settings", e))?;
        row.map(|row| {
            let enabled: bool = row.try_get(7)?;
            common::mirror_settings_from_row(&row, enabled)
        })
        .transpose()
        .map_err(|e| self.0.err("reading the mirror settings", e))
    }

    pub(crate) async fn enable_mirror(
        &self,
        settings: &MirrorSettings,
        at: i64,
    ) -> Result<u64, RegistryError> {
        common::validate_mirror_settings(settings)?;
        let ctx = "enabling the mirror";
        let mut tx = self.0.begin_write().await?;
        let before: Option<(bool, String, Option<String>)> =
            sqlx::query_as(AssertSqlSafe(format!(
                "SELECT enabled, region, endpoint_url FROM mirror_settings WHERE id = 1{}",
                R::FOR_UPDATE
            )))
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.0.err(ctx, e))?;
        let was_enabled = before.as_ref().map(|(enabled, _, _)| *enabled);
        if before.as_ref().is_some_and(|(_, region, endpoint)| {
            *region != settings.region || *endpoint != settings.endpoint_url
        }) {
            // Another account: the AWS certificate ids recorded mean nothing there.
            sqlx::query("DELETE FROM mirror_certificates")
                .execute(&mut *tx)
                .await
                .map_err(|e| self.0.err(ctx, e))?;
        }
        // A changed region or account keeps nothing: the CA is registered again.
        sqlx::query(
            "INSERT INTO mirror_settings (id, enabled, region, endpoint_url, ca_mode, \
                rotated_status, updated_at) VALUES (1, TRUE, $1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET enabled = TRUE, \
                ca_certificate_id = CASE WHEN mirror_settings.region = excluded.region \
                    AND mirror_settings.endpoint_url IS NOT DISTINCT FROM excluded.endpoint_url \
                    THEN mirror_settings.ca_certificate_id END, \
                arn_prefix = CASE WHEN mirror_settings.region = excluded.region \
                    AND mirror_settings.endpoint_url IS NOT DISTINCT FROM excluded.endpoint_url \
                    THEN mirror_settings.arn_prefix END, \
                region = excluded.region, endpoint_url = excluded.endpoint_url, \
                ca_mode = excluded.ca_mode, rotated_status = excluded.rotated_status, \
                updated_at = excluded.updated_at",
        )
        .bind(&settings.region)
        .bind(settings.endpoint_url.clone())
        .bind(&settings.ca_mode)
        .bind(&settings.rotated_status)
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.0.err(ctx, e))?;
        let queued = if was_enabled == Some(true) {
            0
        } else {
            sqlx::query(SQL_BACKFILL)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.0.err(ctx, e))?
                .rows()
        };
        R::insert_events(
            &mut *tx,
            &[NewEvent {
                at,
                kind: EVENT_MIRROR_ENABLED,
                thing_name: None,
                serial: None,
                detail: common::mirror_enabled_detail(settings, queued),
            }],
        )
        .await
        .map_err(|e| self.0.err(ctx, e))?;
        tx.commit().await.map_err(|e| self.0.err(ctx, e))?;
        Ok(queued)
    }

    pub(crate) async fn disable_mirror(&self, at: i64) -> Result<bool, RegistryError> {
        let ctx = "disabling the mirror";
        let mut tx = self.0.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE mirror_settings SET enabled = FALSE, updated_at = $1 WHERE id = 1 AND enabled",
        )
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.0.err(ctx, e))?
        .rows()
            > 0;
        if changed {
            R::insert_events(
                &mut *tx,
                &[NewEvent {
                    at,
                    kind: EVENT_MIRROR_DISABLED,
                    thing_name: None,
                    serial: None,
                    detail: "{}".to_owned(),
                }],
            )
            .await
            .map_err(|e| self.0.err(ctx, e))?;
        }
        tx.commit().await.map_err(|e| self.0.err(ctx, e))?;
        Ok(changed)
    }

    pub(crate) async fn record_mirror_ca(
        &self,
        ca_certificate_id: &str,
        arn_prefix: &str,
        at: i64,
    ) -> Result<(), RegistryError> {
        let ctx = "recording the mirrored CA";
        let mut tx = self.0.begin_write().await?;
        let changed = sqlx::query(
            "UPDATE mirror_settings SET ca_certificate_id = $1, arn_prefix = $2, updated_at = $3 \
             WHERE id = 1 AND (ca_certificate_id IS DISTINCT FROM $1 OR arn_prefix IS DISTINCT FROM $2)",
        )
        .bind(ca_certificate_id.to_owned())
        .bind(arn_prefix.to_owned())
        .bind(at)
        .execute(&mut *tx)
        .await
        .map_err(|e| self.0.err(ctx, e))?
        .rows();
        if changed > 0 {
            R::insert_events(
                &mut *tx,
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
            .map_err(|e| self.0.err(ctx, e))?;
        }
        tx.commit().await.map_err(|e| self.0.err(ctx, e))
    }

    pub(crate) async fn record_mirrored_certificate(
        &self,
        certificate: &MirroredCertificate,
    ) -> Result<(), RegistryError> {
        sqlx::query(
            "INSERT INTO mirror_certificates (serial, certificate_id, certificate_arn, recorded_at) \
             VALUES ($1, $2, $3, $4) \
             ON CONFLICT (serial) DO UPDATE SET certificate_id = excluded.certificate_id, \
                certificate_arn = excluded.certificate_arn, recorded_at = excluded.recorded_at",
        )
        .bind(&certificate.serial)
        .bind(&certificate.certificate_id)
        .bind(&certificate.certificate_arn)
        .bind(certificate.recorded_at)
        .execute(self.0.pool())
        .await
        .map_err(|e| self.0.err("recording a mirrored certificate's AWS id", e))?;
        Ok(())
    }

    pub(crate) async fn mirrored_certificate(
        &self,
        serial: &str,
    ) -> Result<Option<MirroredCertificate>, RegistryError> {
        let row: Option<(String, String, String, i64)> = sqlx::query_as(
            "SELECT serial, certificate_id, certificate_arn, recorded_at \
             FROM mirror_certificates WHERE serial = $1",
        )
        .bind(serial.to_owned())
        .fetch_optional(self.0.pool())
        .await
        .map_err(|e| self.0.err("reading a mirrored certificate's AWS id", e))?;
        Ok(row.map(mirrored))
    }

    pub(crate) async fn mirrored_certificates(
        &self,
    ) -> Result<Vec<MirroredCertificate>, RegistryError> {
        let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
            "SELECT serial, certificate_id, certificate_arn, recorded_at \
             FROM mirror_certificates ORDER BY serial",
        )
        .fetch_all(self.0.pool())
        .await
        .map_err(|e| self.0.err("reading the mirrored certificates' AWS ids", e))?;
        Ok(rows.into_iter().map(mirrored).collect())
    }

    pub(crate) async fn queue_mirror_ops(
        &self,
        ops: &[NewMirrorOp],
        at: i64,
    ) -> Result<u64, RegistryError> {
        if ops.is_empty() {
            return Ok(0);
        }
        let ctx = "queueing mirror operations";
        let mut tx = self.0.begin_write().await?;
        let mut queued = 0;
        for op in ops {
            queued += sqlx::query(SQL_QUEUE)
                .bind(&op.queue)
                .bind(op.kind.as_str().to_owned())
                .bind(&op.subject)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.0.err(ctx, e))?
                .rows();
        }
        tx.commit().await.map_err(|e| self.0.err(ctx, e))?;
        Ok(queued)
    }

    pub(crate) async fn claim_mirror_ops(
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
        let mut tx = self.0.begin_write().await?;
        let rows = sqlx::query(AssertSqlSafe(sql_claim(R::SKIP_LOCKED)))
            .bind(owner.to_owned())
            .bind(now.saturating_add(lease_secs))
            .bind(now)
            .bind(i64::from(limit))
            .bind(ignore_backoff)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.0.err(ctx, e))?;
        let mut ops = rows
            .iter()
            .map(common::mirror_op_from_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.0.err(ctx, e))?;
        tx.commit().await.map_err(|e| self.0.err(ctx, e))?;
        ops.sort_unstable_by_key(|op| op.id);
        Ok(ops)
    }

    pub(crate) async fn finish_mirror_ops(
        &self,
        owner: &str,
        results: &[MirrorResult],
        at: i64,
    ) -> Result<u64, RegistryError> {
        if results.is_empty() {
            return Ok(0);
        }
        let ctx = "finishing mirror operations";
        let mut tx = self.0.begin_write().await?;
        let mut recorded = 0;
        let mut events = Vec::new();
        for result in results {
            let done = match &result.outcome {
                MirrorOutcome::Applied => {
                    sqlx::query("DELETE FROM mirror_outbox WHERE id = $1 AND lease_owner = $2")
                        .bind(result.id)
                        .bind(owner.to_owned())
                        .execute(&mut *tx)
                        .await
                }
                MirrorOutcome::Retry { error, not_before } => {
                    sqlx::query(
                        "UPDATE mirror_outbox SET attempts = attempts + 1, last_error = $3, \
                            not_before = $4, lease_owner = NULL, lease_until = NULL \
                         WHERE id = $1 AND lease_owner = $2",
                    )
                    .bind(result.id)
                    .bind(owner.to_owned())
                    .bind(error)
                    .bind(*not_before)
                    .execute(&mut *tx)
                    .await
                }
                MirrorOutcome::Park { error } => {
                    let parked: Option<(String, String, String)> = sqlx::query_as(
                        "UPDATE mirror_outbox SET state = 'parked', attempts = attempts + 1, \
                            last_error = $3, lease_owner = NULL, lease_until = NULL \
                         WHERE id = $1 AND lease_owner = $2 RETURNING kind, subject, queue",
                    )
                    .bind(result.id)
                    .bind(owner.to_owned())
                    .bind(error)
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(|e| self.0.err(ctx, e))?;
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
            recorded += done.map_err(|e| self.0.err(ctx, e))?.rows();
        }
        R::insert_events(&mut *tx, &events)
            .await
            .map_err(|e| self.0.err(ctx, e))?;
        tx.commit().await.map_err(|e| self.0.err(ctx, e))?;
        Ok(recorded)
    }

    pub(crate) async fn mirror_backlog(
        &self,
        parked_limit: u32,
    ) -> Result<MirrorBacklog, RegistryError> {
        let ctx = "reading the mirror backlog";
        let (pending, retrying, in_flight, parked): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE state = 'pending'), \
                    COUNT(*) FILTER (WHERE state = 'pending' AND attempts > 0), \
                    COUNT(*) FILTER (WHERE state = 'pending' AND lease_owner IS NOT NULL), \
                    COUNT(*) FILTER (WHERE state = 'parked') FROM mirror_outbox",
        )
        .fetch_one(self.0.pool())
        .await
        .map_err(|e| self.0.err(ctx, e))?;
        let oldest = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MIRROR_OP_COLUMNS} FROM mirror_outbox WHERE state = 'pending' \
             ORDER BY id LIMIT 1"
        )))
        .fetch_optional(self.0.pool())
        .await
        .map_err(|e| self.0.err(ctx, e))?;
        let parked_rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {MIRROR_OP_COLUMNS} FROM mirror_outbox WHERE state = 'parked' \
             ORDER BY id LIMIT $1"
        )))
        .bind(i64::from(parked_limit))
        .fetch_all(self.0.pool())
        .await
        .map_err(|e| self.0.err(ctx, e))?;
        Ok(MirrorBacklog {
            pending,
            retrying,
            in_flight,
            oldest_pending: oldest
                .as_ref()
                .map(common::mirror_op_from_row)
                .transpose()
                .map_err(|e| self.0.err(ctx, e))?,
            parked,
            parked_ops: parked_rows
                .iter()
                .map(common::mirror_op_from_row)
                .collect::<Result<_, _>>()
                .map_err(|e| self.0.err(ctx, e))?,
        })
    }

    pub(crate) async fn requeue_parked_mirror_ops(&self, _at: i64) -> Result<u64, RegistryError> {
        let ctx = "re-queueing parked mirror operations";
        let mut tx = self.0.begin_write().await?;
        let n = sqlx::query(
            "UPDATE mirror_outbox SET state = 'pending', attempts = 0, not_before = 0 \
             WHERE state = 'parked'",
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| self.0.err(ctx, e))?
        .rows();
        tx.commit().await.map_err(|e| self.0.err(ctx, e))?;
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
