//! Provisioning by claim, written once for both backends: claim certificates, the
//! certificates the Fleet Provisioning API issues, and RegisterThing.
//!
//! RegisterThing runs in one write transaction: the provisional row is locked first
//! (so two presentations of one token serialise and the second finds it spent), then
//! the claim (its use count), then — inside a savepoint, so a refused registration
//! leaves nothing — the thing is created if missing, the certificate inserted and the
//! registration applied by the same code as a first connect
//! ([`Flows::register_in`]), which locks the thing, then the certificate.

use crate::common::{
    self, EVENT_CERT_ISSUED, EVENT_THING_CREATED, NewEvent, is_unique_violation, to_json,
};
use crate::dialect::{Dialect, Flows, StepError, step, write_tx};
use crate::{
    ClaimRecord, NewClaim, NewProvisional, ProvisionalOutcome, ProvisionalRecord,
    ProvisionalRegistration, RegistrationOutcome, RegistryError,
};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Row, Type};

const EVENT_CLAIM_CREATED: &str = "claim.created";
const EVENT_CLAIM_REVOKED: &str = "claim.revoked";
const EVENT_CLAIM_CERT_ISSUED: &str = "claim.certificate_issued";
const EVENT_CLAIM_USED: &str = "claim.used";
const EVENT_CLAIM_CERT_EXPIRED: &str = "claim.certificate_expired";

const CLAIM_COLUMNS: &str = "SELECT name, template, serial, fingerprint_sha256, status, \
     max_uses, uses, not_before, not_after, created_at, revoked_at FROM claims";
const PROVISIONAL_COLUMNS: &str = "SELECT serial, fingerprint_sha256, claim_name, session, \
     state, token_expires_at, thing_name, der FROM provisional_certificates";

fn claim_from_row<'r, W>(row: &'r W) -> sqlx::Result<ClaimRecord>
where
    W: Row,
    usize: ColumnIndex<W>,
    String: Decode<'r, W::Database> + Type<W::Database>,
    i64: Decode<'r, W::Database> + Type<W::Database>,
    Option<i64>: Decode<'r, W::Database> + Type<W::Database>,
{
    let status: String = row.try_get(4)?;
    Ok(ClaimRecord {
        name: row.try_get(0)?,
        template: row.try_get(1)?,
        serial: row.try_get(2)?,
        fingerprint_sha256: row.try_get(3)?,
        revoked: status == "revoked",
        max_uses: row.try_get(5)?,
        uses: row.try_get(6)?,
        not_before: row.try_get(7)?,
        not_after: row.try_get(8)?,
        created_at: row.try_get(9)?,
        revoked_at: row.try_get(10)?,
    })
}

fn provisional_from_row<'r, W>(row: &'r W) -> sqlx::Result<ProvisionalRecord>
where
    W: Row,
    usize: ColumnIndex<W>,
    String: Decode<'r, W::Database> + Type<W::Database>,
    i64: Decode<'r, W::Database> + Type<W::Database>,
    Option<String>: Decode<'r, W::Database> + Type<W::Database>,
    Vec<u8>: Decode<'r, W::Database> + Type<W::Database>,
{
    Ok(ProvisionalRecord {
        serial: row.try_get(0)?,
        fingerprint_sha256: row.try_get(1)?,
        claim_name: row.try_get(2)?,
        session: row.try_get(3)?,
        state: row.try_get(4)?,
        token_expires_at: row.try_get(5)?,
        thing_name: row.try_get(6)?,
        der: row.try_get(7)?,
    })
}

fn event(
    at: i64,
    kind: &'static str,
    thing: Option<&str>,
    serial: &str,
    detail: String,
) -> NewEvent {
    NewEvent {
        at,
        kind,
        thing_name: thing.map(str::to_owned),
        serial: Some(serial.to_owned()),
        detail,
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
    for<'q> Vec<u8>: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
{
    pub(crate) async fn create_claim(&self, claim: &NewClaim) -> Result<(), RegistryError> {
        let c = &claim.certificate;
        let created = write_tx!(self, "recording a claim", |tx| {
            sqlx::query(
                "INSERT INTO claims (name, template, serial, fingerprint_sha256, status, \
                    max_uses, uses, not_before, not_after, created_at, der) \
                 VALUES ($1, $2, $3, $4, 'active', $5, 0, $6, $7, $8, $9)",
            )
            .bind(claim.name.clone())
            .bind(claim.template.clone())
            .bind(c.serial.clone())
            .bind(c.fingerprint_sha256.clone())
            .bind(claim.max_uses)
            .bind(c.not_before)
            .bind(c.not_after)
            .bind(claim.at)
            .bind(c.der.clone())
            .execute(&mut *tx)
            .await
            .map_err(step("recording a claim"))?;
            let detail = serde_json::json!({
                "claim": claim.name, "template": claim.template, "max_uses": claim.max_uses,
            });
            R::insert_events(
                &mut tx,
                &[event(
                    claim.at,
                    EVENT_CLAIM_CREATED,
                    None,
                    &c.serial,
                    detail.to_string(),
                )],
            )
            .await
            .map_err(step("appending events"))?;
            Ok(())
        });
        match created {
            Ok(()) => Ok(()),
            Err((_, e)) if is_unique_violation(&e) => Err(RegistryError::DuplicateSerial(format!(
                "a claim named {:?} (or with serial {}) exists already",
                claim.name, c.serial
            ))),
            Err((context, e)) => Err(self.0.err(context, e)),
        }
    }

    async fn claims_where(
        &self,
        condition: &str,
        value: Option<&str>,
    ) -> Result<Vec<ClaimRecord>, RegistryError> {
        let sql = format!("{CLAIM_COLUMNS}{condition} ORDER BY name");
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(value) = value {
            q = q.bind(value.to_owned());
        }
        let rows = q
            .fetch_all(self.0.pool())
            .await
            .map_err(|e| self.0.err("reading claims", e))?;
        rows.iter()
            .map(claim_from_row)
            .collect::<Result<_, _>>()
            .map_err(|e| self.0.err("reading claims", e))
    }

    pub(crate) async fn list_claims(&self) -> Result<Vec<ClaimRecord>, RegistryError> {
        self.claims_where("", None).await
    }

    pub(crate) async fn get_claim(&self, name: &str) -> Result<Option<ClaimRecord>, RegistryError> {
        Ok(self
            .claims_where(" WHERE name = $1", Some(name))
            .await?
            .pop())
    }

    pub(crate) async fn claim_by_fingerprint(
        &self,
        fingerprint_sha256: &str,
    ) -> Result<Option<ClaimRecord>, RegistryError> {
        Ok(self
            .claims_where(" WHERE fingerprint_sha256 = $1", Some(fingerprint_sha256))
            .await?
            .pop())
    }

    pub(crate) async fn revoke_claim(&self, name: &str, at: i64) -> Result<bool, RegistryError> {
        let revoked = write_tx!(self, "revoking a claim", |tx| {
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT serial, status FROM claims WHERE name = $1{}",
                R::FOR_UPDATE
            )))
            .bind(name.to_owned())
            .fetch_optional(&mut *tx)
            .await
            .map_err(step("reading the claim"))?;
            let Some(row) = row else {
                return Ok(None);
            };
            let serial: String = row.try_get(0).map_err(step("reading the claim"))?;
            let status: String = row.try_get(1).map_err(step("reading the claim"))?;
            if status == "revoked" {
                return Ok(Some(false));
            }
            sqlx::query("UPDATE claims SET status = 'revoked', revoked_at = $2 WHERE name = $1")
                .bind(name.to_owned())
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(step("revoking the claim"))?;
            sqlx::query(
                "UPDATE provisional_certificates SET state = 'revoked', finished_at = $2 \
                 WHERE claim_name = $1 AND state = 'pending'",
            )
            .bind(name.to_owned())
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(step("revoking the claim's pending certificates"))?;
            let detail = serde_json::json!({ "claim": name });
            R::insert_events(
                &mut tx,
                &[event(
                    at,
                    EVENT_CLAIM_REVOKED,
                    None,
                    &serial,
                    detail.to_string(),
                )],
            )
            .await
            .map_err(step("appending events"))?;
            Ok(Some(true))
        })
        .map_err(|(context, e)| self.0.err(context, e))?;
        revoked.ok_or_else(|| RegistryError::NotFound(format!("no claim named {name:?}")))
    }

    pub(crate) async fn record_provisional(&self, p: &NewProvisional) -> Result<(), RegistryError> {
        let recorded = write_tx!(self, "recording a provisional certificate", |tx| {
            Self::record_provisional_in(&mut tx, p).await
        });
        self.provisional_recorded(recorded, std::slice::from_ref(p))
    }

    /// Several provisional certificates in one transaction (one durable commit).
    pub(crate) async fn record_provisional_batch(
        &self,
        batch: &[NewProvisional],
    ) -> Result<(), RegistryError> {
        let recorded = write_tx!(self, "recording provisional certificates", |tx| {
            for p in batch {
                Self::record_provisional_in(&mut tx, p).await?;
            }
            Ok(())
        });
        self.provisional_recorded(recorded, batch)
    }

    fn provisional_recorded(
        &self,
        recorded: Result<(), StepError>,
        batch: &[NewProvisional],
    ) -> Result<(), RegistryError> {
        match recorded {
            Ok(()) => Ok(()),
            Err((_, e)) if is_unique_violation(&e) => Err(RegistryError::DuplicateSerial(format!(
                "serial {} is recorded already",
                batch
                    .iter()
                    .map(|p| p.certificate.serial.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            Err((context, e)) => Err(self.0.err(context, e)),
        }
    }

    async fn record_provisional_in(
        tx: &mut sqlx::Transaction<'static, R::Db>,
        p: &NewProvisional,
    ) -> Result<(), StepError> {
        let c = &p.certificate;
        sqlx::query(
            "INSERT INTO provisional_certificates (serial, fingerprint_sha256, \
                public_key_sha256, claim_name, token_sha256, session, issuer, origin, \
                key_algorithm, not_before, not_after, renew_at, created_at, \
                token_expires_at, state, der) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, \
                'pending', $15)",
        )
        .bind(c.serial.clone())
        .bind(c.fingerprint_sha256.clone())
        .bind(c.public_key_sha256.clone())
        .bind(p.claim_name.clone())
        .bind(p.token_sha256.clone())
        .bind(p.session.clone())
        .bind(c.issuer.clone())
        .bind(c.origin.as_str().to_owned())
        .bind(c.key_algorithm.clone())
        .bind(c.not_before)
        .bind(c.not_after)
        .bind(c.renew_at)
        .bind(p.at)
        .bind(p.token_expires_at)
        .bind(c.der.clone())
        .execute(&mut **tx)
        .await
        .map_err(step("recording a provisional certificate"))?;
        let detail = serde_json::json!({
            "claim": p.claim_name, "origin": c.origin.as_str(),
            "token_expires_at": p.token_expires_at,
        });
        R::insert_events(
            tx,
            &[event(
                p.at,
                EVENT_CLAIM_CERT_ISSUED,
                None,
                &c.serial,
                detail.to_string(),
            )],
        )
        .await
        .map_err(step("appending events"))?;
        Ok(())
    }

    pub(crate) async fn provisional_by_token(
        &self,
        token_sha256: &str,
    ) -> Result<Option<ProvisionalRecord>, RegistryError> {
        let sql = format!("{PROVISIONAL_COLUMNS} WHERE token_sha256 = $1");
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(token_sha256.to_owned())
            .fetch_optional(self.0.pool())
            .await
            .map_err(|e| self.0.err("reading a provisional certificate", e))?;
        row.as_ref()
            .map(provisional_from_row)
            .transpose()
            .map_err(|e| self.0.err("reading a provisional certificate", e))
    }

    pub(crate) async fn register_provisional(
        &self,
        p: &ProvisionalRegistration,
    ) -> Result<ProvisionalOutcome, RegistryError> {
        let requested = match common::requested_policies(&p.registration) {
            Ok(requested) => requested,
            Err(reason) => return Ok(ProvisionalOutcome::Refused { reason }),
        };
        write_tx!(self, "a RegisterThing", |tx| {
            Self::register_provisional_in(&mut tx, p, &requested).await
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    /// Several RegisterThings in one transaction (one durable commit), each exactly as
    /// [`Self::register_provisional`] would run it after the ones before it.
    pub(crate) async fn register_provisional_batch(
        &self,
        batch: &[ProvisionalRegistration],
    ) -> Result<Vec<ProvisionalOutcome>, RegistryError> {
        write_tx!(self, "a group of RegisterThings", |tx| {
            let mut outcomes = Vec::with_capacity(batch.len());
            for p in batch {
                outcomes.push(match common::requested_policies(&p.registration) {
                    Ok(requested) => Self::register_provisional_in(&mut tx, p, &requested).await?,
                    Err(reason) => ProvisionalOutcome::Refused { reason },
                });
            }
            Ok(outcomes)
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }

    /// One RegisterThing inside the caller's write transaction; whatever it writes is in
    /// a savepoint that is kept only when the thing is registered.
    async fn register_provisional_in(
        tx: &mut sqlx::Transaction<'static, R::Db>,
        p: &ProvisionalRegistration,
        requested: &[common::RequestedPolicy<'_>],
    ) -> Result<ProvisionalOutcome, StepError> {
        let reg = &p.registration;
        let at = reg.at;
        let sql = format!(
            "SELECT serial, fingerprint_sha256, public_key_sha256, claim_name, session, \
                issuer, origin, key_algorithm, not_before, not_after, renew_at, \
                token_expires_at, state, der \
             FROM provisional_certificates WHERE token_sha256 = $1{}",
            R::FOR_UPDATE
        );
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(p.token_sha256.clone())
            .fetch_optional(&mut **tx)
            .await
            .map_err(step("reading the provisional certificate"))?
        else {
            return Ok(ProvisionalOutcome::TokenUnknown);
        };
        let get = step("reading the provisional certificate");
        let serial: String = row.try_get(0).map_err(&get)?;
        let fingerprint: String = row.try_get(1).map_err(&get)?;
        let public_key: String = row.try_get(2).map_err(&get)?;
        let claim_name: String = row.try_get(3).map_err(&get)?;
        let session: String = row.try_get(4).map_err(&get)?;
        let issuer: String = row.try_get(5).map_err(&get)?;
        let origin: String = row.try_get(6).map_err(&get)?;
        let key_algorithm: String = row.try_get(7).map_err(&get)?;
        let not_before: i64 = row.try_get(8).map_err(&get)?;
        let not_after: i64 = row.try_get(9).map_err(&get)?;
        let renew_at: i64 = row.try_get(10).map_err(&get)?;
        let expires_at: i64 = row.try_get(11).map_err(&get)?;
        let state: String = row.try_get(12).map_err(&get)?;
        let der: Vec<u8> = row.try_get(13).map_err(&get)?;
        if state != "pending" {
            return Ok(ProvisionalOutcome::TokenUsed);
        }
        if expires_at < at {
            return Ok(ProvisionalOutcome::TokenExpired);
        }
        if session != p.session || claim_name != p.claim_name {
            return Ok(ProvisionalOutcome::TokenNotYours);
        }
        let sql = format!(
            "SELECT status, max_uses, uses FROM claims WHERE name = $1{}",
            R::FOR_UPDATE
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(claim_name.clone())
            .fetch_one(&mut **tx)
            .await
            .map_err(step("reading the claim"))?;
        let status: String = row.try_get(0).map_err(step("reading the claim"))?;
        let max_uses: Option<i64> = row.try_get(1).map_err(step("reading the claim"))?;
        let uses: i64 = row.try_get(2).map_err(step("reading the claim"))?;
        if status != "active" {
            return Ok(ProvisionalOutcome::ClaimRevoked);
        }
        if max_uses.is_some_and(|max| uses >= max) {
            return Ok(ProvisionalOutcome::ClaimExhausted);
        }

        let mut one = sqlx::Acquire::begin(&mut *tx)
            .await
            .map_err(step("starting a savepoint"))?;
        let created = sqlx::query(
            "INSERT INTO things (name, template, created_at, updated_at) \
             VALUES ($1, $2, $3, $3) ON CONFLICT (name) DO NOTHING RETURNING name",
        )
        .bind(reg.thing_name.clone())
        .bind(reg.template.clone())
        .bind(at)
        .fetch_optional(&mut *one)
        .await
        .map_err(step("recording the thing"))?
        .is_some();
        let expected_version = if created {
            1
        } else {
            reg.expected_thing_version
        };
        sqlx::query(
            "INSERT INTO certificates (serial, fingerprint_sha256, public_key_sha256, \
                thing_name, issuer, status, origin, key_algorithm, not_before, not_after, \
                created_at, delivered_at, renew_at, der) \
             VALUES ($1, $2, $3, $4, $5, 'active', $6, $7, $8, $9, $10, $10, $11, $12)",
        )
        .bind(serial.clone())
        .bind(fingerprint.clone())
        .bind(public_key)
        .bind(reg.thing_name.clone())
        .bind(issuer)
        .bind(origin.clone())
        .bind(key_algorithm)
        .bind(not_before)
        .bind(not_after)
        .bind(at)
        .bind(renew_at)
        .bind(der)
        .execute(&mut *one)
        .await
        .map_err(step("recording the certificate"))?;
        let mut events = Vec::with_capacity(2);
        if created {
            events.push(event(
                at,
                EVENT_THING_CREATED,
                Some(&reg.thing_name),
                &serial,
                to_json(&serde_json::json!({ "template": reg.template, "claim": claim_name })),
            ));
        }
        events.push(event(
            at,
            EVENT_CERT_ISSUED,
            Some(&reg.thing_name),
            &serial,
            to_json(&serde_json::json!({ "origin": origin, "claim": claim_name })),
        ));
        R::insert_events(&mut one, &events)
            .await
            .map_err(step("appending events"))?;
        let mut registration = reg.clone();
        registration.serial = serial.clone();
        registration.expected_thing_version = expected_version;
        let (outcome, keep) =
            Self::register_in(&mut one, &registration, requested, false, None).await?;
        let policies = match (outcome, keep) {
            (RegistrationOutcome::Registered { policies }, true) => policies,
            (RegistrationOutcome::ThingChanged, _) => {
                one.rollback().await.map_err(step("ending a savepoint"))?;
                return Ok(ProvisionalOutcome::ThingChanged);
            }
            (RegistrationOutcome::Refused { reason }, _) => {
                one.rollback().await.map_err(step("ending a savepoint"))?;
                return Ok(ProvisionalOutcome::Refused { reason });
            }
            (other, _) => {
                one.rollback().await.map_err(step("ending a savepoint"))?;
                return Ok(ProvisionalOutcome::Refused {
                    reason: format!("unexpected registration outcome {other:?}"),
                });
            }
        };
        sqlx::query(
            "UPDATE provisional_certificates SET state = 'registered', thing_name = $2, \
                finished_at = $3 WHERE serial = $1",
        )
        .bind(serial.clone())
        .bind(reg.thing_name.clone())
        .bind(at)
        .execute(&mut *one)
        .await
        .map_err(step("spending the token"))?;
        sqlx::query("UPDATE claims SET uses = uses + 1 WHERE name = $1")
            .bind(claim_name.clone())
            .execute(&mut *one)
            .await
            .map_err(step("counting the claim's use"))?;
        R::insert_events(
            &mut one,
            &[event(
                at,
                EVENT_CLAIM_USED,
                Some(&reg.thing_name),
                &serial,
                to_json(&serde_json::json!({ "claim": claim_name, "template": reg.template })),
            )],
        )
        .await
        .map_err(step("appending events"))?;
        one.commit().await.map_err(step("ending a savepoint"))?;
        Ok(ProvisionalOutcome::Registered {
            serial,
            policies,
            thing_created: created,
        })
    }

    pub(crate) async fn expire_provisional(&self, now: i64) -> Result<Vec<String>, RegistryError> {
        write_tx!(self, "expiring provisional certificates", |tx| {
            let rows = sqlx::query(
                "UPDATE provisional_certificates SET state = 'revoked', finished_at = $1 \
                 WHERE state = 'pending' AND token_expires_at < $1 RETURNING serial, claim_name",
            )
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(step("expiring provisional certificates"))?;
            let mut serials = Vec::with_capacity(rows.len());
            let mut events = Vec::with_capacity(rows.len());
            for row in &rows {
                let serial: String = row.try_get(0).map_err(step("reading serials"))?;
                let claim: String = row.try_get(1).map_err(step("reading serials"))?;
                events.push(event(
                    now,
                    EVENT_CLAIM_CERT_EXPIRED,
                    None,
                    &serial,
                    to_json(&serde_json::json!({ "claim": claim })),
                ));
                serials.push(serial);
            }
            if !events.is_empty() {
                R::insert_events(&mut tx, &events)
                    .await
                    .map_err(step("appending events"))?;
            }
            Ok(serials)
        })
        .map_err(|(context, e)| self.0.err(context, e))
    }
}
