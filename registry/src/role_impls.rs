//! Every role trait, implemented once for both backends: each method hands its
//! arguments to the flow written once over the backend's [`Dialect`](crate::dialect::Dialect).

use crate::postgres::PgRegistry;
use crate::sqlite::SqliteRegistry;
use crate::*;
use std::collections::HashMap;

/// Implements the role traits (and so [`Registry`]) for a backend.
macro_rules! impl_roles {
    ($backend:ty) => {
        #[async_trait::async_trait]
        impl crate::Issuance for $backend {
            async fn record_issued(
                &self,
                records: &[IssueRecord],
            ) -> Result<Vec<IssueOutcome>, RegistryError> {
                crate::dialect::Flows(self).record_issued(records).await
            }

            async fn mark_delivered(
                &self,
                serials: &[String],
                at: i64,
            ) -> Result<(), RegistryError> {
                crate::dialect::Flows(self)
                    .mark_delivered(serials, at)
                    .await
            }

            async fn active_certificates(
                &self,
                thing_names: &[String],
            ) -> Result<HashMap<String, Vec<CertificateRecord>>, RegistryError> {
                crate::dialect::Flows(self)
                    .active_certificates(thing_names)
                    .await
            }
        }

        #[async_trait::async_trait]
        impl crate::Registrations for $backend {
            async fn register(
                &self,
                registration: &Registration,
            ) -> Result<RegistrationOutcome, RegistryError> {
                crate::dialect::Flows(self).register(registration).await
            }

            async fn register_batch(
                &self,
                registrations: &[Registration],
            ) -> Result<Vec<RegistrationOutcome>, RegistryError> {
                crate::dialect::Flows(self)
                    .register_batch(registrations)
                    .await
            }

            fn registration_group_size(&self) -> usize {
                <$backend as crate::dialect::Dialect>::REGISTRATION_GROUP
            }

            async fn device_state(
                &self,
                fingerprint_sha256: &str,
            ) -> Result<Option<DeviceState>, RegistryError> {
                crate::dialect::Flows(self)
                    .device_state(fingerprint_sha256)
                    .await
            }

            async fn record_connections(
                &self,
                connections: &[ConnectionRecord],
            ) -> Result<(), RegistryError> {
                crate::dialect::Flows(self)
                    .record_connections(connections)
                    .await
            }

            async fn recent_connections(
                &self,
                fingerprint_sha256: &str,
            ) -> Result<Vec<ConnectionRecord>, RegistryError> {
                crate::dialect::Flows(self)
                    .recent_connections(fingerprint_sha256)
                    .await
            }
        }

        #[async_trait::async_trait]
        impl crate::Rotations for $backend {
            async fn due_certificates(
                &self,
                now: i64,
                expiring_before: Option<i64>,
                limit: Option<u32>,
            ) -> Result<Vec<CertificateRecord>, RegistryError> {
                crate::dialect::Flows(self)
                    .due_certificates(now, expiring_before, limit)
                    .await
            }

            async fn open_due_rotations(
                &self,
                now: i64,
                expiring_before: Option<i64>,
            ) -> Result<u64, RegistryError> {
                crate::dialect::Flows(self)
                    .open_due_rotations(now, expiring_before)
                    .await
            }

            async fn open_rotations_for(
                &self,
                serials: &[String],
                now: i64,
            ) -> Result<Vec<String>, RegistryError> {
                crate::dialect::Flows(self)
                    .open_rotations_for(serials, now)
                    .await
            }

            async fn claim_rotations(
                &self,
                owner: &str,
                now: i64,
                lease_secs: i64,
                limit: u32,
            ) -> Result<Vec<RotationClaim>, RegistryError> {
                crate::dialect::Flows(self)
                    .claim_rotations(owner, now, lease_secs, limit)
                    .await
            }

            async fn complete_rotations(
                &self,
                owner: &str,
                items: &[PreparedReplacement],
            ) -> Result<Vec<bool>, RegistryError> {
                crate::dialect::Flows(self)
                    .complete_rotations(owner, items)
                    .await
            }

            async fn fail_rotation(
                &self,
                owner: &str,
                old_serial: &str,
                error: &str,
                at: i64,
                max_attempts: u32,
            ) -> Result<bool, RegistryError> {
                crate::dialect::Flows(self)
                    .fail_rotation(owner, old_serial, error, at, max_attempts)
                    .await
            }

            async fn replace_certificate(
                &self,
                replacement: &Replacement,
            ) -> Result<ReplaceOutcome, RegistryError> {
                crate::dialect::Flows(self)
                    .replace_certificate(replacement)
                    .await
            }

            async fn take_replacement(
                &self,
                old_serial: &str,
                at: i64,
            ) -> Result<Option<TakenReplacement>, RegistryError> {
                crate::dialect::Flows(self)
                    .take_replacement(old_serial, at)
                    .await
            }

            async fn confirm_replacement(
                &self,
                serial: &str,
                at: i64,
            ) -> Result<Option<String>, RegistryError> {
                crate::dialect::Flows(self)
                    .confirm_replacement(serial, at)
                    .await
            }

            async fn get_rotation(
                &self,
                old_serial: &str,
            ) -> Result<Option<RotationRecord>, RegistryError> {
                crate::dialect::Flows(self).get_rotation(old_serial).await
            }

            async fn list_rotations(
                &self,
                filter: &RotationFilter,
            ) -> Result<Vec<RotationRecord>, RegistryError> {
                crate::dialect::Flows(self).list_rotations(filter).await
            }

            async fn rotation_backlog(&self, now: i64) -> Result<RotationBacklog, RegistryError> {
                crate::dialect::Flows(self).rotation_backlog(now).await
            }
        }

        #[async_trait::async_trait]
        impl crate::Revocations for $backend {
            async fn revoked_serials(&self, now: i64) -> Result<Vec<String>, RegistryError> {
                crate::dialect::Flows(self).revoked_serials(now).await
            }

            async fn revoke(
                &self,
                revocation: &Revocation,
            ) -> Result<Vec<RevokedEntry>, RegistryError> {
                crate::dialect::Flows(self).revoke(revocation).await
            }

            async fn revoked_entries(&self, now: i64) -> Result<Vec<RevokedEntry>, RegistryError> {
                crate::dialect::Flows(self).revoked_entries(now).await
            }

            async fn latest_crl(&self) -> Result<Option<StoredCrl>, RegistryError> {
                crate::dialect::Flows(self).latest_crl().await
            }

            async fn store_crl(&self, crl: &StoredCrl) -> Result<bool, RegistryError> {
                crate::dialect::Flows(self).store_crl(crl).await
            }
        }

        #[async_trait::async_trait]
        impl crate::MirrorOutbox for $backend {
            async fn mirror_settings(&self) -> Result<Option<MirrorSettings>, RegistryError> {
                crate::dialect::Flows(self).mirror_settings().await
            }

            async fn enable_mirror(
                &self,
                settings: &MirrorSettings,
                at: i64,
            ) -> Result<u64, RegistryError> {
                crate::dialect::Flows(self)
                    .enable_mirror(settings, at)
                    .await
            }

            async fn disable_mirror(&self, at: i64) -> Result<bool, RegistryError> {
                crate::dialect::Flows(self).disable_mirror(at).await
            }

            async fn record_mirror_ca(
                &self,
                ca_certificate_id: &str,
                arn_prefix: &str,
                at: i64,
            ) -> Result<(), RegistryError> {
                crate::dialect::Flows(self)
                    .record_mirror_ca(ca_certificate_id, arn_prefix, at)
                    .await
            }

            async fn record_mirrored_certificate(
                &self,
                certificate: &MirroredCertificate,
            ) -> Result<(), RegistryError> {
                crate::dialect::Flows(self)
                    .record_mirrored_certificate(certificate)
                    .await
            }

            async fn mirrored_certificate(
                &self,
                serial: &str,
            ) -> Result<Option<MirroredCertificate>, RegistryError> {
                crate::dialect::Flows(self)
                    .mirrored_certificate(serial)
                    .await
            }

            async fn mirrored_certificates(
                &self,
            ) -> Result<Vec<MirroredCertificate>, RegistryError> {
                crate::dialect::Flows(self).mirrored_certificates().await
            }

            async fn queue_mirror_ops(
                &self,
                ops: &[NewMirrorOp],
                at: i64,
            ) -> Result<u64, RegistryError> {
                crate::dialect::Flows(self).queue_mirror_ops(ops, at).await
            }

            async fn claim_mirror_ops(
                &self,
                owner: &str,
                now: i64,
                lease_secs: i64,
                limit: u32,
                ignore_backoff: bool,
            ) -> Result<Vec<MirrorOp>, RegistryError> {
                crate::dialect::Flows(self)
                    .claim_mirror_ops(owner, now, lease_secs, limit, ignore_backoff)
                    .await
            }

            async fn finish_mirror_ops(
                &self,
                owner: &str,
                results: &[MirrorResult],
                at: i64,
            ) -> Result<u64, RegistryError> {
                crate::dialect::Flows(self)
                    .finish_mirror_ops(owner, results, at)
                    .await
            }

            async fn mirror_backlog(
                &self,
                parked_limit: u32,
            ) -> Result<MirrorBacklog, RegistryError> {
                crate::dialect::Flows(self)
                    .mirror_backlog(parked_limit)
                    .await
            }

            async fn requeue_parked_mirror_ops(&self, at: i64) -> Result<u64, RegistryError> {
                crate::dialect::Flows(self)
                    .requeue_parked_mirror_ops(at)
                    .await
            }
        }

        #[async_trait::async_trait]
        impl crate::PolicyVersions for $backend {
            async fn replace_default_policy_version(
                &self,
                policy: &str,
                document: &serde_json::Value,
                at: i64,
            ) -> Result<Option<i64>, RegistryError> {
                crate::dialect::Flows(self)
                    .replace_default_policy_version(policy, document, at)
                    .await
            }

            async fn policy_versions(
                &self,
                policy: &str,
            ) -> Result<Vec<(i64, serde_json::Value)>, RegistryError> {
                crate::dialect::Flows(self).policy_versions(policy).await
            }
        }

        #[async_trait::async_trait]
        impl crate::ThingGroups for $backend {
            async fn attach_group_policy(
                &self,
                group: &str,
                policy: &str,
                document: &serde_json::Value,
                at: i64,
            ) -> Result<bool, RegistryError> {
                crate::dialect::Flows(self)
                    .attach_group_policy(group, policy, document, at)
                    .await
            }

            async fn add_things_to_group(
                &self,
                group: &str,
                things: &[String],
                at: i64,
            ) -> Result<Vec<String>, RegistryError> {
                crate::dialect::Flows(self)
                    .add_things_to_group(group, things, at)
                    .await
            }

            async fn group_policies(&self, group: &str) -> Result<Vec<String>, RegistryError> {
                crate::dialect::Flows(self).group_policies(group).await
            }

            async fn things_policies_changed_since(
                &self,
                since: i64,
            ) -> Result<Vec<(String, i64)>, RegistryError> {
                crate::dialect::Flows(self)
                    .things_policies_changed_since(since)
                    .await
            }
        }

        #[async_trait::async_trait]
        impl crate::Audits for $backend {
            async fn record_audit(
                &self,
                task: &AuditTaskRecord,
                findings: &[AuditFindingRecord],
            ) -> Result<(), RegistryError> {
                crate::dialect::Flows(self)
                    .record_audit(task, findings)
                    .await
            }

            async fn audit_tasks(&self, limit: u32) -> Result<Vec<AuditTaskRecord>, RegistryError> {
                crate::dialect::Flows(self).audit_tasks(limit).await
            }

            async fn audit_task(
                &self,
                task_id: &str,
            ) -> Result<Option<AuditTaskRecord>, RegistryError> {
                crate::dialect::Flows(self).audit_task(task_id).await
            }

            async fn audit_findings(
                &self,
                filter: &AuditFindingFilter,
            ) -> Result<Vec<AuditFindingRecord>, RegistryError> {
                crate::dialect::Flows(self).audit_findings(filter).await
            }

            async fn put_audit_suppression(
                &self,
                suppression: &AuditSuppression,
            ) -> Result<(), RegistryError> {
                crate::dialect::Flows(self)
                    .put_audit_suppression(suppression)
                    .await
            }

            async fn delete_audit_suppression(
                &self,
                check_name: &str,
                resource_id: &str,
                at: i64,
            ) -> Result<bool, RegistryError> {
                crate::dialect::Flows(self)
                    .delete_audit_suppression(check_name, resource_id, at)
                    .await
            }

            async fn audit_suppressions(&self) -> Result<Vec<AuditSuppression>, RegistryError> {
                crate::dialect::Flows(self).audit_suppressions().await
            }

            async fn audited_certificates(&self) -> Result<Vec<AuditedCertificate>, RegistryError> {
                crate::dialect::Flows(self).audited_certificates().await
            }

            async fn mqtt_sessions(
                &self,
                since: i64,
                until: i64,
            ) -> Result<Vec<ConnectionRecord>, RegistryError> {
                crate::dialect::Flows(self)
                    .mqtt_sessions(since, until)
                    .await
            }
        }

        #[async_trait::async_trait]
        impl crate::Claims for $backend {
            async fn create_claim(&self, claim: &NewClaim) -> Result<(), RegistryError> {
                crate::dialect::Flows(self).create_claim(claim).await
            }

            async fn list_claims(&self) -> Result<Vec<ClaimRecord>, RegistryError> {
                crate::dialect::Flows(self).list_claims().await
            }

            async fn get_claim(&self, name: &str) -> Result<Option<ClaimRecord>, RegistryError> {
                crate::dialect::Flows(self).get_claim(name).await
            }

            async fn claim_by_fingerprint(
                &self,
                fingerprint_sha256: &str,
            ) -> Result<Option<ClaimRecord>, RegistryError> {
                crate::dialect::Flows(self)
                    .claim_by_fingerprint(fingerprint_sha256)
                    .await
            }

            async fn revoke_claim(&self, name: &str, at: i64) -> Result<bool, RegistryError> {
                crate::dialect::Flows(self).revoke_claim(name, at).await
            }

            async fn record_provisional(
                &self,
                provisional: &NewProvisional,
            ) -> Result<(), RegistryError> {
                crate::dialect::Flows(self)
                    .record_provisional(provisional)
                    .await
            }

            async fn provisional_by_token(
                &self,
                token_sha256: &str,
            ) -> Result<Option<ProvisionalRecord>, RegistryError> {
                crate::dialect::Flows(self)
                    .provisional_by_token(token_sha256)
                    .await
            }

            async fn register_provisional(
                &self,
                registration: &ProvisionalRegistration,
            ) -> Result<ProvisionalOutcome, RegistryError> {
                crate::dialect::Flows(self)
                    .register_provisional(registration)
                    .await
            }

            async fn record_provisional_batch(
                &self,
                batch: &[NewProvisional],
            ) -> Result<(), RegistryError> {
                crate::dialect::Flows(self)
                    .record_provisional_batch(batch)
                    .await
            }

            async fn register_provisional_batch(
                &self,
                batch: &[ProvisionalRegistration],
            ) -> Result<Vec<ProvisionalOutcome>, RegistryError> {
                crate::dialect::Flows(self)
                    .register_provisional_batch(batch)
                    .await
            }

            async fn expire_provisional(&self, now: i64) -> Result<Vec<String>, RegistryError> {
                crate::dialect::Flows(self).expire_provisional(now).await
            }
        }

        #[async_trait::async_trait]
        impl crate::Queries for $backend {
            async fn get_thing(&self, name: &str) -> Result<Option<ThingRecord>, RegistryError> {
                crate::dialect::Flows(self).get_thing(name).await
            }

            async fn list_things(
                &self,
                filter: &ThingFilter,
            ) -> Result<Vec<ThingRecord>, RegistryError> {
                crate::dialect::Flows(self).list_things(filter).await
            }

            async fn get_certificate(
                &self,
                serial: &str,
            ) -> Result<Option<CertificateRecord>, RegistryError> {
                crate::dialect::Flows(self).get_certificate(serial).await
            }

            async fn list_certificates(
                &self,
                filter: &CertificateFilter,
            ) -> Result<Vec<CertificateRecord>, RegistryError> {
                crate::dialect::Flows(self).list_certificates(filter).await
            }

            async fn list_events(
                &self,
                filter: &EventFilter,
            ) -> Result<Vec<EventRecord>, RegistryError> {
                crate::dialect::Flows(self).list_events(filter).await
            }

            async fn counts(&self) -> Result<RegistryCounts, RegistryError> {
                crate::dialect::Flows(self).counts().await
            }

            async fn get_policy(&self, name: &str) -> Result<Option<PolicyRecord>, RegistryError> {
                crate::dialect::Flows(self).get_policy(name).await
            }

            async fn list_policies(&self) -> Result<Vec<PolicyRecord>, RegistryError> {
                crate::dialect::Flows(self).list_policies().await
            }

            async fn policies_of_thing(
                &self,
                thing_name: &str,
            ) -> Result<Vec<PolicyRecord>, RegistryError> {
                crate::dialect::Flows(self)
                    .policies_of_thing(thing_name)
                    .await
            }

            async fn policies_of_certificate(
                &self,
                serial: &str,
            ) -> Result<Vec<PolicyRecord>, RegistryError> {
                crate::dialect::Flows(self)
                    .policies_of_certificate(serial)
                    .await
            }
        }

        #[async_trait::async_trait]
        impl crate::Registry for $backend {
            fn backend(&self) -> &'static str {
                <$backend as crate::dialect::Dialect>::NAME
            }

            async fn ping(&self) -> Result<(), RegistryError> {
                crate::dialect::Flows(self).ping().await
            }

            async fn probe_writes(&self) -> Result<(), RegistryError> {
                crate::dialect::Flows(self).probe_writes().await
            }
        }
    };
}

impl_roles!(SqliteRegistry);
impl_roles!(PgRegistry);
