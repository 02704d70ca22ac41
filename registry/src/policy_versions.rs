//! Policy versions, written once for both backends ([`crate::PolicyVersions`]).
//!
//! `policies.document` is always the default version's document, so every reader of
//! policies (device state, registrations, the audit, the mirror) sees the operative one
//! without knowing about versions. Replacing the default version keeps the earlier ones in
//! `policy_versions` (migration 0011) and marks every thing the policy applies to
//! (`things.policies_changed_at`), so a broker drops sessions granted under the old one.

use crate::RegistryError;
use crate::common::{self, NewEvent, to_json};
use crate::dialect::{Dialect, Flows, step, write_tx};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Row, Type};

const EVENT_DEFAULT_VERSION_REPLACED: &str = "policy.default_version_replaced";

impl<R: Dialect> Flows<'_, R>
where
    for<'c> &'c mut <R::Db as Database>::Connection: Executor<'c, Database = R::Db>,
    <R::Db as Database>::Arguments: sqlx::IntoArguments<R::Db>,
    usize: ColumnIndex<<R::Db as Database>::Row>,
    for<'q> String: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i64: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Option<String>: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Option<i64>: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
    for<'q> i32: Decode<'q, R::Db> + Type<R::Db>,
    for<'q> Vec<u8>: Encode<'q, R::Db> + Decode<'q, R::Db> + Type<R::Db>,
{
    pub(crate) async fn replace_default_policy_version(
        &self,
        policy: &str,
        document: &serde_json::Value,
        at: i64,
    ) -> Result<Option<i64>, RegistryError> {
        write_tx!(self, "replacing a policy's default version", |tx| {
            let row = sqlx::query(AssertSqlSafe(format!(
                "SELECT CAST(document AS TEXT), default_version, updated_at FROM policies \
                 WHERE name = $1{}",
                R::FOR_UPDATE
            )))
            .bind(policy.to_owned())
            .fetch_optional(&mut *tx)
            .await
            .map_err(step("locking the policy"))?;
            let Some(row) = row else {
                return Ok(Err(RegistryError::NotFound(format!(
                    "no policy named {policy:?}"
                ))));
            };
            let current: String = row.try_get(0).map_err(step("reading the policy"))?;
            let version: i64 = row.try_get(1).map_err(step("reading the policy"))?;
            let since: i64 = row.try_get(2).map_err(step("reading the policy"))?;
            let current_value: serde_json::Value =
                common::parse_json(&current).map_err(step("reading the policy"))?;
            if &current_value == document {
                return Ok(Ok(None));
            }
            // The version being replaced, kept (the first time a policy is replaced it has
            // no row yet), then the new one.
            let insert = format!(
                "INSERT INTO policy_versions (policy_name, version_id, document, created_at) \
                 VALUES ($1, $2, {}, $4) ON CONFLICT (policy_name, version_id) DO NOTHING",
                R::json_column("$3")
            );
            for (id, text, created) in [
                (version, current.clone(), since),
                (version + 1, to_json(document), at),
            ] {
                sqlx::query(AssertSqlSafe(insert.as_str()))
                    .bind(policy.to_owned())
                    .bind(id)
                    .bind(text)
                    .bind(created)
                    .execute(&mut *tx)
                    .await
                    .map_err(step("keeping the policy's versions"))?;
            }
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE policies SET document = {}, default_version = $3, updated_at = $4 \
                 WHERE name = $1",
                R::json_column("$2")
            )))
            .bind(policy.to_owned())
            .bind(to_json(document))
            .bind(version + 1)
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(step("replacing the policy's document"))?;
            // Every thing the policy applies to: through an active certificate, or one of
            // its groups.
            sqlx::query(AssertSqlSafe(format!(
                "UPDATE things SET policies_changed_at = $2 WHERE name IN ( \
                    SELECT c.thing_name FROM policy_attachments a \
                    JOIN certificates c ON c.serial = a.serial \
                    WHERE a.policy_name = $1 AND c.status = 'active') \
                 OR EXISTS (SELECT 1 FROM thing_group_policies g \
                    WHERE g.policy_name = $1 AND g.group_name IN ({}))",
                R::json_values_of("things.groups")
            )))
            .bind(policy.to_owned())
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(step("marking the policy's things"))?;
            R::insert_events(
                &mut tx,
                &[NewEvent {
                    at,
                    kind: EVENT_DEFAULT_VERSION_REPLACED,
                    thing_name: None,
                    serial: None,
                    detail: to_json(&serde_json::json!({
                        "policy": policy,
                        "from_version": version,
                        "to_version": version + 1,
                    })),
                }],
            )
            .await
            .map_err(step("appending events"))?;
            Ok(Ok(Some(version + 1)))
        })
        .map_err(|(context, e)| self.0.err(context, e))?
    }

    pub(crate) async fn policy_versions(
        &self,
        policy: &str,
    ) -> Result<Vec<(i64, serde_json::Value)>, RegistryError> {
        let q = sqlx::query(
            "SELECT version_id, CAST(document AS TEXT) FROM policy_versions \
             WHERE policy_name = $1 ORDER BY version_id",
        )
        .bind(policy.to_owned());
        self.rows("reading a policy's versions", q, |r| {
            let text: String = r.try_get(1)?;
            Ok((r.try_get(0)?, common::parse_json(&text)?))
        })
        .await
    }
}
