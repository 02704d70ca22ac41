//! Thing groups and their policies, written once for both backends
//! ([`crate::ThingGroups`]).
//!
//! A thing's groups are the names in `things.groups` (set by its template's `ThingGroups`
//! or by [`Flows::add_things_to_group`]). A policy attached to a group
//! (`thing_group_policies`, migration 0010) applies to every certificate of every thing in
//! it: the device state's policies are the certificate's own and its thing's groups'.
//! Whenever the set a thing gets through its groups changes, `things.policies_changed_at`
//! says when, so that a broker can drop sessions granted under the old set.

use crate::RegistryError;
use crate::common::{self, NewEvent, to_json};
use crate::dialect::{Dialect, Flows, step, write_tx};
use sqlx::{AssertSqlSafe, ColumnIndex, Database, Decode, Encode, Executor, Row, Type};

const EVENT_GROUP_POLICY_ATTACHED: &str = "thing_group.policy_attached";
const EVENT_THING_ADDED_TO_GROUP: &str = "thing.added_to_group";

/// What a group change could not do; mapped to [`RegistryError`] after the transaction.
enum Refused {
    UnknownThing(String),
    PolicyConflict(String),
}

impl From<Refused> for RegistryError {
    fn from(r: Refused) -> Self {
        match r {
            Refused::UnknownThing(name) => {
                RegistryError::NotFound(format!("thing {name:?} is not in the registry"))
            }
            Refused::PolicyConflict(name) => RegistryError::InvalidValue(format!(
                "policy {name:?} exists with another document (policies are immutable: \
                 choose another name)"
            )),
        }
    }
}

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
    pub(crate) async fn attach_group_policy(
        &self,
        group: &str,
        policy: &str,
        document: &serde_json::Value,
        at: i64,
    ) -> Result<bool, RegistryError> {
        let outcome = write_tx!(self, "attaching a policy to a thing group", |tx| {
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO policies (name, document, created_at, updated_at) \
                 VALUES ($1, {}, $3, $3) ON CONFLICT (name) DO NOTHING",
                R::json_column("$2")
            )))
            .bind(policy.to_owned())
            .bind(to_json(document))
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(step("creating the policy"))?;
            let stored: String =
                sqlx::query("SELECT CAST(document AS TEXT) FROM policies WHERE name = $1")
                    .bind(policy.to_owned())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(step("reading the policy"))?
                    .try_get(0)
                    .map_err(step("reading the policy"))?;
            let stored: serde_json::Value =
                common::parse_json(&stored).map_err(step("reading the policy"))?;
            if &stored != document {
                return Ok(Err(Refused::PolicyConflict(policy.to_owned())));
            }
            let attached = sqlx::query(
                "INSERT INTO thing_group_policies (group_name, policy_name, attached_at) \
                 VALUES ($1, $2, $3) ON CONFLICT (group_name, policy_name) DO NOTHING",
            )
            .bind(group.to_owned())
            .bind(policy.to_owned())
            .bind(at)
            .execute(&mut *tx)
            .await
            .map_err(step("attaching the policy"))?;
            let attached = crate::dialect::RowsAffected::rows(&attached) == 1;
            if attached {
                // Every thing in the group now gets one more policy.
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE things SET policies_changed_at = $2 \
                     WHERE EXISTS (SELECT 1 FROM ({}) AS g WHERE g.value = $1)",
                    R::json_values_of("things.groups")
                )))
                .bind(group.to_owned())
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(step("marking the group's things"))?;
                R::insert_events(
                    &mut tx,
                    &[NewEvent {
                        at,
                        kind: EVENT_GROUP_POLICY_ATTACHED,
                        thing_name: None,
                        serial: None,
                        detail: to_json(&serde_json::json!({ "group": group, "policy": policy })),
                    }],
                )
                .await
                .map_err(step("appending events"))?;
            }
            Ok(Ok(attached))
        })
        .map_err(|(context, e)| self.0.err(context, e))?;
        outcome.map_err(RegistryError::from)
    }

    pub(crate) async fn add_things_to_group(
        &self,
        group: &str,
        things: &[String],
        at: i64,
    ) -> Result<Vec<String>, RegistryError> {
        let outcome = write_tx!(self, "adding things to a thing group", |tx| {
            // Every thing is read (and locked) before any is changed: an unknown one
            // ends the call with nothing written (the transaction commits no change).
            let mut current = Vec::with_capacity(things.len());
            for name in things {
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT CAST(groups AS TEXT), version FROM things WHERE name = $1{}",
                    R::FOR_NO_KEY_UPDATE
                )))
                .bind(name.clone())
                .fetch_optional(&mut *tx)
                .await
                .map_err(step("locking the thing"))?;
                let Some(row) = row else {
                    return Ok(Err(Refused::UnknownThing(name.clone())));
                };
                let groups: String = row.try_get(0).map_err(step("reading the thing"))?;
                let version: i64 = row.try_get(1).map_err(step("reading the thing"))?;
                let groups: Vec<String> =
                    common::parse_json(&groups).map_err(step("reading the thing"))?;
                current.push((name, groups, version));
            }
            let mut added = Vec::new();
            for (name, mut groups, version) in current {
                if groups.iter().any(|g| g == group) || added.contains(name) {
                    continue;
                }
                groups.push(group.to_owned());
                groups.sort();
                sqlx::query(AssertSqlSafe(format!(
                    "UPDATE things SET groups = {}, version = $3, updated_at = $4, \
                        policies_changed_at = $4 WHERE name = $1",
                    R::json_column("$2")
                )))
                .bind(name.clone())
                .bind(to_json(&groups))
                .bind(version + 1)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(step("updating the thing"))?;
                R::insert_events(
                    &mut tx,
                    &[NewEvent {
                        at,
                        kind: EVENT_THING_ADDED_TO_GROUP,
                        thing_name: Some(name.clone()),
                        serial: None,
                        detail: to_json(&serde_json::json!({ "group": group })),
                    }],
                )
                .await
                .map_err(step("appending events"))?;
                added.push(name.clone());
            }
            Ok(Ok(added))
        })
        .map_err(|(context, e)| self.0.err(context, e))?;
        outcome.map_err(RegistryError::from)
    }

    pub(crate) async fn group_policies(&self, group: &str) -> Result<Vec<String>, RegistryError> {
        let q = sqlx::query(
            "SELECT policy_name FROM thing_group_policies WHERE group_name = $1 \
             ORDER BY policy_name",
        )
        .bind(group.to_owned());
        self.rows("reading a thing group's policies", q, |r| r.try_get(0))
            .await
    }

    pub(crate) async fn things_policies_changed_since(
        &self,
        since: i64,
    ) -> Result<Vec<(String, i64)>, RegistryError> {
        let q = sqlx::query(
            "SELECT name, policies_changed_at FROM things \
             WHERE policies_changed_at IS NOT NULL AND policies_changed_at >= $1 \
             ORDER BY policies_changed_at, name",
        )
        .bind(since);
        self.rows("reading things whose policies changed", q, |r| {
            Ok((r.try_get(0)?, r.try_get(1)?))
        })
        .await
    }
}
