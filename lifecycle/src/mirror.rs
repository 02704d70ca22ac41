//! The AWS IoT Core mirror: applies the registry's outbox to AWS IoT, and reconciles.
//!
//! The registry queues an operation in the same transaction as every change the mirror
//! follows (a trigger on the event log). An operation names a subject — the CA, a thing,
//! a certificate, a policy — and applying it makes AWS match the subject's *current*
//! registry state, so applying twice, late, or after AWS lost its state is harmless.
//! Operations of one thing apply in order (its thing before its certificates); things
//! are independent, so one thing's failure never holds up another.
//!
//! Failures: network errors, timeouts and throttling retry with exponential backoff and
//! full jitter for as long as AWS stays away (an outage loses nothing); AWS server
//! errors retry [`MirrorOptions::max_server_errors`] times; anything else AWS refuses
//! parks the operation with its error (`aws status` lists it; `aws sync --retry-parked`
//! puts it back).

use crate::renewal::Clock;
use crate::{LifecycleError, unix_now};
pub use fleetcert_aws::CaMode;
use fleetcert_aws::{AwsError, CertStatus as AwsStatus, IotApi, ThingSpec};
use fleetcert_ca::IssuingCa;
pub use fleetcert_registry::MirrorBacklog;
use fleetcert_registry::{
    CertStatus, CertificateFilter, CertificateRecord, MirrorOp, MirrorOpKind, MirrorOutcome,
    MirrorResult, MirrorSettings, MirroredCertificate, NewMirrorOp, Registry, ThingFilter,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How the worker paces itself. The defaults suit AWS IoT's control-plane limits
/// (tens of requests per second per API) and a one-hour outage.
#[derive(Debug, Clone)]
pub struct MirrorOptions {
    /// Operations claimed per round (each thing contributes at most one per round).
    pub batch: u32,
    /// Operations applied at once.
    pub concurrency: usize,
    /// How long a claim is ours before another worker may take it over.
    pub lease: Duration,
    /// First retry delay; doubles per attempt up to `max_backoff` (full jitter).
    pub base_backoff: Duration,
    /// Longest delay between two attempts of one operation. Default 5 minutes.
    pub max_backoff: Duration,
    /// AWS 500s before an operation is parked (moto answers 500 for calls it lacks).
    pub max_server_errors: i64,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            batch: 256,
            concurrency: 16,
            lease: Duration::from_secs(300),
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            max_server_errors: 8,
        }
    }
}

/// Counters since the process started, for `/metrics` and reports.
#[derive(Debug, Default)]
pub struct MirrorStats {
    /// Operations that made AWS match the registry.
    pub applied: AtomicU64,
    /// Failed attempts scheduled to run again after a backoff.
    pub retried: AtomicU64,
    /// Operations given up on until an operator requeues them.
    pub parked: AtomicU64,
}

/// What one drain did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SyncReport {
    /// Operations applied.
    pub applied: u64,
    /// Attempts that failed and were rescheduled after a backoff.
    pub retried: u64,
    /// Operations parked (AWS refused them, or too many server errors).
    pub parked: u64,
    /// Batches claimed from the outbox (rounds that found nothing are not counted).
    pub rounds: u64,
    /// Wall time of the run.
    pub seconds: f64,
    /// Errors of the operations retried or parked in this run (at most 20).
    pub errors: Vec<String>,
}

/// How `aws sync` ended ([`Mirror::sync`]).
#[derive(Debug, Clone)]
pub struct SyncOutcome {
    /// What this process applied, retried and parked, over all its rounds.
    pub report: SyncReport,
    /// The outbox when it stopped.
    pub backlog: MirrorBacklog,
    /// It stopped because the time was up while other workers still held operations.
    pub timed_out: bool,
}

/// A difference between the registry and AWS IoT.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Drift {
    /// e.g. `ca_missing`, `thing_missing`, `thing_differs`, `certificate_missing`,
    /// `certificate_status`, `principal_missing`, `principal_not_detached`,
    /// `policy_missing`, `policy_differs`, `policy_not_attached`.
    pub kind: &'static str,
    /// What differs: the CA's SHA-256 fingerprint, a thing name, a certificate serial or
    /// a policy name, depending on `kind`.
    pub subject: String,
    /// Specifics for an operator (what AWS holds, the thing or policy concerned); empty
    /// when `kind` says it all.
    pub detail: String,
}

/// What [`Mirror::reconcile`] compared and found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReconcileReport {
    /// Registry things compared with AWS.
    pub things_checked: u64,
    /// Registry certificates compared with AWS: those not expired yet (expired ones are
    /// not expected in AWS).
    pub certificates_checked: u64,
    /// Every difference found, in the order checked (CA, things and their certificates,
    /// policies).
    pub drift: Vec<Drift>,
    /// Operations queued to repair the drift (0 with `--dry-run`).
    pub queued: u64,
    /// Wall time of the comparison.
    pub seconds: f64,
}

/// What AWS should hold for one certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desired {
    status: AwsStatus,
    /// Attached to its thing (false once a confirmed rotation retired it).
    attached: bool,
    /// Its policies attached.
    policies: bool,
}

/// The mirror worker. One per process; several processes may run against one
/// registry (claims are leased).
pub struct Mirror {
    registry: Arc<dyn Registry>,
    api: Arc<dyn IotApi>,
    ca: Arc<IssuingCa>,
    clock: Arc<dyn Clock>,
    options: MirrorOptions,
    owner: String,
    stats: Arc<MirrorStats>,
    settings: Mutex<MirrorSettings>,
    /// Policies (name → document text) known to be in AWS as we have them, so a
    /// fleet's thousand attachments do not re-check one policy a thousand times.
    policies_synced: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mirror")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

impl Mirror {
    /// A worker for the stored settings (`aws enable` must have run).
    pub async fn new(
        registry: Arc<dyn Registry>,
        api: Arc<dyn IotApi>,
        ca: Arc<IssuingCa>,
        clock: Arc<dyn Clock>,
        options: MirrorOptions,
    ) -> Result<Self, LifecycleError> {
        let settings = registry.mirror_settings().await?.ok_or_else(|| {
            LifecycleError::BadInput(
                "the AWS mirror is not set up: run `fleetcert aws enable --region R` first"
                    .to_owned(),
            )
        })?;
        Ok(Mirror {
            registry,
            api,
            ca,
            clock,
            options,
            owner: format!("mirror-{}-{}", std::process::id(), unix_now()),
            stats: Arc::new(MirrorStats::default()),
            settings: Mutex::new(settings),
            policies_synced: Mutex::new(HashMap::new()),
        })
    }

    /// This worker's counters since it was made, for `/metrics`.
    pub fn stats(&self) -> Arc<MirrorStats> {
        self.stats.clone()
    }

    /// Registers the issuing CA with AWS and records its id and the ARN prefix. A CA
    /// already registered under the id recorded (the one AWS returned) is left as it is.
    pub async fn register_ca(&self) -> Result<String, AwsError> {
        let (known, prefix) = {
            let settings = self.settings.lock().await;
            (
                settings.ca_certificate_id.clone(),
                settings.arn_prefix.clone(),
            )
        };
        if let (Some(id), Some(_)) = (known, prefix)
            && self.api.ca_status(&id).await?.is_some()
        {
            return Ok(id);
        }
        let mode = ca_mode(&self.settings.lock().await.ca_mode);
        let (id, prefix) =
            register_issuing_ca(self.api.as_ref(), &self.ca, mode, self.clock.now()).await?;
        self.registry
            .record_mirror_ca(&id, &prefix, self.clock.now())
            .await
            .map_err(|e| AwsError::Transient {
                operation: "RegisterCACertificate",
                message: format!("recording the CA in the registry: {e}"),
            })?;
        let mut settings = self.settings.lock().await;
        settings.ca_certificate_id = Some(id.clone());
        settings.arn_prefix = Some(prefix);
        Ok(id)
    }

    /// Puts parked operations (given up after repeated failures) back in their queues,
    /// to be tried again now; returns how many (`aws sync --retry-parked`).
    pub async fn requeue_parked(&self) -> Result<u64, LifecycleError> {
        Ok(self
            .registry
            .requeue_parked_mirror_ops(self.clock.now())
            .await?)
    }

    /// The outbox at a glance (for `/metrics`).
    pub async fn backlog(&self) -> Result<fleetcert_registry::MirrorBacklog, LifecycleError> {
        Ok(self.registry.mirror_backlog(0).await?)
    }

    async fn arn_prefix(&self) -> Result<String, AwsError> {
        if let Some(p) = self.settings.lock().await.arn_prefix.clone() {
            return Ok(p);
        }
        self.register_ca().await?;
        self.settings
            .lock()
            .await
            .arn_prefix
            .clone()
            .ok_or_else(|| AwsError::Config("the CA registration gave no ARN".to_owned()))
    }

    /// Applies everything that is due, round after round, until nothing is left that
    /// may run now. With `now_please`, operations waiting out a backoff go too (first
    /// round only, so an outage does not spin).
    pub async fn drain(self: &Arc<Self>, now_please: bool) -> Result<SyncReport, LifecycleError> {
        let started = Instant::now();
        let mut report = SyncReport::default();
        let mut first = true;
        loop {
            let now = self.clock.now();
            let ops = self
                .registry
                .claim_mirror_ops(
                    &self.owner,
                    now,
                    self.options.lease.as_secs() as i64,
                    self.options.batch,
                    now_please && first,
                )
                .await?;
            first = false;
            if ops.is_empty() {
                break;
            }
            report.rounds += 1;
            let results = self.apply_all(ops).await;
            let applied_before = report.applied;
            for (result, error) in &results {
                match &result.outcome {
                    MirrorOutcome::Applied => report.applied += 1,
                    MirrorOutcome::Retry { .. } => report.retried += 1,
                    MirrorOutcome::Park { .. } => report.parked += 1,
                }
                if let Some(error) = error
                    && report.errors.len() < 20
                {
                    report.errors.push(error.clone());
                }
            }
            let results: Vec<MirrorResult> = results.into_iter().map(|(r, _)| r).collect();
            self.registry
                .finish_mirror_ops(&self.owner, &results, self.clock.now())
                .await?;
            if report.applied == applied_before {
                // Nothing went through (AWS down, or everything refused): stop here
                // rather than chase short backoffs; the next run picks it up.
                break;
            }
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// `aws sync`: applies everything that is due now (including operations waiting out
    /// a backoff), then, while operations remain that another worker holds under its
    /// lease (`serve` applying them) or that queue behind those, waits for them, polling
    /// every `poll`, until the outbox is empty or `timeout` has passed. It stops waiting
    /// at once when one of its own rounds fails (AWS unreachable or refusing): waiting
    /// would not help then.
    pub async fn sync(
        self: &Arc<Self>,
        timeout: Duration,
        poll: Duration,
    ) -> Result<SyncOutcome, LifecycleError> {
        let started = Instant::now();
        let deadline = started.checked_add(timeout);
        let mut report = SyncReport::default();
        let mut first = true;
        loop {
            let round = self.drain(first).await?;
            first = false;
            report.applied += round.applied;
            report.retried += round.retried;
            report.parked += round.parked;
            report.rounds += round.rounds;
            for e in round.errors {
                if report.errors.len() < 20 {
                    report.errors.push(e);
                }
            }
            let backlog = self.registry.mirror_backlog(20).await?;
            let now = Instant::now();
            let timed_out = deadline.is_some_and(|d| now >= d);
            if backlog.pending == 0 || round.retried > 0 || round.parked > 0 || timed_out {
                report.seconds = started.elapsed().as_secs_f64();
                return Ok(SyncOutcome {
                    timed_out: backlog.pending > 0
                        && round.retried == 0
                        && round.parked == 0
                        && timed_out,
                    report,
                    backlog,
                });
            }
            let left = deadline.map_or(poll, |d| d.saturating_duration_since(now));
            tokio::time::sleep(poll.min(left)).await;
        }
    }

    /// Runs [`Self::drain`] every `interval` until `stop` resolves (inside `serve`).
    /// Errors are logged, never fatal: the outbox keeps everything for the next round.
    pub async fn run(
        self: Arc<Self>,
        interval: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            match self.drain(false).await {
                Ok(r) if r.applied + r.retried + r.parked > 0 => tracing::info!(
                    applied = r.applied,
                    retried = r.retried,
                    parked = r.parked,
                    "AWS mirror round"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "AWS mirror round failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    }

    async fn apply_all(
        self: &Arc<Self>,
        ops: Vec<MirrorOp>,
    ) -> Vec<(MirrorResult, Option<String>)> {
        let semaphore = Arc::new(tokio::sync::Semaphore::new(self.options.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for op in ops {
            let this = self.clone();
            let permit = semaphore.clone();
            tasks.spawn(async move {
                let _permit = permit.acquire_owned().await;
                let outcome = this.apply(&op).await;
                (op, outcome)
            });
        }
        let mut results = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let Ok((op, outcome)) = joined else { continue };
            results.push(self.judge(&op, outcome));
        }
        results
    }

    /// Turns an application's result into the outbox outcome (and counts it).
    fn judge(
        &self,
        op: &MirrorOp,
        outcome: Result<(), AwsError>,
    ) -> (MirrorResult, Option<String>) {
        let describe = |e: &AwsError| format!("{} {}: {e}", op.kind, op.subject);
        let (outcome, error) = match outcome {
            Ok(()) => {
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                (MirrorOutcome::Applied, None)
            }
            Err(e)
                if e.is_retryable()
                    && !(matches!(e, AwsError::ServerError { .. })
                        && op.attempts + 1 >= self.options.max_server_errors) =>
            {
                self.stats.retried.fetch_add(1, Ordering::Relaxed);
                let delay = backoff(
                    op.attempts,
                    self.options.base_backoff,
                    self.options.max_backoff,
                );
                tracing::debug!(op = op.id, error = %e, delay_secs = delay, "mirror operation will retry");
                (
                    MirrorOutcome::Retry {
                        error: e.to_string(),
                        not_before: self.clock.now() + delay,
                    },
                    Some(describe(&e)),
                )
            }
            Err(e) => {
                self.stats.parked.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(op = op.id, kind = %op.kind, subject = %op.subject, error = %e, "mirror operation parked");
                (
                    MirrorOutcome::Park {
                        error: e.to_string(),
                    },
                    Some(describe(&e)),
                )
            }
        };
        (MirrorResult { id: op.id, outcome }, error)
    }

    async fn apply(&self, op: &MirrorOp) -> Result<(), AwsError> {
        match op.kind {
            MirrorOpKind::Ca => self.register_ca().await.map(|_| ()),
            MirrorOpKind::Thing => self.apply_thing(&op.subject).await,
            MirrorOpKind::Certificate => self.apply_certificate(&op.subject).await,
            MirrorOpKind::Policy => self.apply_policy(&op.subject, true).await,
            _ => Ok(()),
        }
    }

    async fn registry_read<T>(
        &self,
        what: &'static str,
        result: Result<T, fleetcert_registry::RegistryError>,
    ) -> Result<T, AwsError> {
        // A registry hiccup is transient from the outbox's point of view.
        result.map_err(|e| AwsError::Transient {
            operation: what,
            message: format!("registry: {e}"),
        })
    }

    async fn apply_thing(&self, name: &str) -> Result<(), AwsError> {
        let thing = self
            .registry_read("reading a thing", self.registry.get_thing(name).await)
            .await?;
        let Some(thing) = thing else { return Ok(()) };
        self.api.put_thing(&thing_spec(&thing)).await
    }

    async fn apply_policy(&self, name: &str, force: bool) -> Result<(), AwsError> {
        let policy = self
            .registry_read("reading a policy", self.registry.get_policy(name).await)
            .await?;
        let Some(policy) = policy else { return Ok(()) };
        let document = policy.document.to_string();
        if !force && self.policies_synced.lock().await.get(name) == Some(&document) {
            return Ok(());
        }
        self.api.put_policy(name, &document).await?;
        self.policies_synced
            .lock()
            .await
            .insert(name.to_owned(), document);
        Ok(())
    }

    async fn apply_certificate(&self, serial: &str) -> Result<(), AwsError> {
        let cert = self
            .registry_read(
                "reading a certificate",
                self.registry.get_certificate(serial).await,
            )
            .await?;
        let Some(cert) = cert else { return Ok(()) };
        let rotated_status = self.settings.lock().await.rotated_status.clone();
        let Some(desired) = desired(&cert, &rotated_status, self.clock.now()) else {
            // Expired: AWS refuses to register it and no device can use it.
            return Ok(());
        };
        // The CA first: AWS registers a certificate only under a CA it knows.
        self.arn_prefix().await?;
        let known = self
            .registry_read(
                "reading a certificate's AWS id",
                self.registry.mirrored_certificate(serial).await,
            )
            .await?;
        let pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert.der.clone()));
        let registered = match self
            .api
            .register_certificate(&pem, self.ca.issuing_cert_pem(), desired.status)
            .await
        {
            // AWS forgot the CA (an account that lost its state): register it again.
            Err(AwsError::NotFound { .. } | AwsError::Permanent { .. }) => {
                self.register_ca().await?;
                self.api
                    .register_certificate(&pem, self.ca.issuing_cert_pem(), desired.status)
                    .await?
            }
            other => other?,
        };
        // From here on the certificate is named as AWS named it (its answer to
        // RegisterCertificate, or the id in its "already exists" answer): AWS hashes the
        // DER, moto and LocalStack by default the PEM text.
        if known.as_ref().is_none_or(|k| {
            k.certificate_id != registered.id || k.certificate_arn != registered.arn
        }) {
            let record = MirroredCertificate {
                serial: serial.to_owned(),
                certificate_id: registered.id.clone(),
                certificate_arn: registered.arn.clone(),
                recorded_at: self.clock.now(),
            };
            self.registry_read(
                "recording a certificate's AWS id",
                self.registry.record_mirrored_certificate(&record).await,
            )
            .await?;
        }
        let arn = registered.arn.as_str();
        if !registered.created {
            match self
                .api
                .update_certificate(&registered.id, desired.status)
                .await
            {
                // REVOKED is final in AWS: a retired certificate that is already
                // REVOKED there stays so whatever the rotated-status setting says now.
                Err(AwsError::Permanent { code, .. })
                    if desired.status != AwsStatus::Active && code.contains("CertificateState") => {
                }
                other => other?,
            }
        }
        if desired.policies {
            let policies = self
                .registry_read(
                    "reading policies",
                    self.registry.policies_of_certificate(serial).await,
                )
                .await?;
            for policy in policies {
                self.apply_policy(&policy.name, false).await?;
                match self.api.attach_policy(&policy.name, arn).await {
                    Err(AwsError::NotFound { .. }) => {
                        // The policy vanished from AWS since we cached it.
                        self.apply_policy(&policy.name, true).await?;
                        self.api.attach_policy(&policy.name, arn).await?;
                    }
                    other => other?,
                }
            }
        }
        if desired.attached {
            match self.api.attach_thing_principal(&cert.thing_name, arn).await {
                Err(AwsError::NotFound { .. }) => {
                    // The thing is missing in AWS: make it, then attach.
                    self.apply_thing(&cert.thing_name).await?;
                    self.api
                        .attach_thing_principal(&cert.thing_name, arn)
                        .await?;
                }
                other => other?,
            }
        } else if cert.status == CertStatus::Revoked && is_rotated(&cert) {
            self.api
                .detach_thing_principal(&cert.thing_name, arn)
                .await?;
        }
        Ok(())
    }

    /// Compares the registry with AWS IoT and, unless `dry_run`, queues what repairs
    /// the drift (then `drain` applies it).
    pub async fn reconcile(&self, dry_run: bool) -> Result<ReconcileReport, LifecycleError> {
        let started = Instant::now();
        let aws = LifecycleError::Aws;
        let now = self.clock.now();
        let mut report = ReconcileReport::default();
        let mut ops: Vec<NewMirrorOp> = Vec::new();
        let settings = self.settings.lock().await.clone();

        let ca_present = match &settings.ca_certificate_id {
            Some(id) => self.api.ca_status(id).await.map_err(aws)?.is_some(),
            None => false,
        };
        if !ca_present {
            report.drift.push(Drift {
                kind: "ca_missing",
                subject: self.ca.fingerprint_sha256_hex().to_owned(),
                detail: "the issuing CA is not registered".to_owned(),
            });
            ops.push(NewMirrorOp::ca());
        }

        let remote_things: HashMap<String, fleetcert_aws::RemoteThing> = self
            .api
            .list_things()
            .await
            .map_err(aws)?
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let remote_certs: HashMap<String, String> = self
            .api
            .list_certificates()
            .await
            .map_err(aws)?
            .into_iter()
            .map(|c| (c.id, c.status))
            .collect();

        let things = self.registry.list_things(&ThingFilter::default()).await?;
        let certs = self
            .registry
            .list_certificates(&CertificateFilter::default())
            .await?;
        let mut certs_by_thing: HashMap<&str, Vec<&CertificateRecord>> = HashMap::new();
        for c in &certs {
            certs_by_thing
                .entry(c.thing_name.as_str())
                .or_default()
                .push(c);
        }
        let prefix = settings.arn_prefix.clone();
        // The ids AWS gave the certificates the mirror registered; a certificate it never
        // registered is looked for under the id AWS computes (SHA-256 of the DER).
        let aws_ids: HashMap<String, MirroredCertificate> = self
            .registry
            .mirrored_certificates()
            .await?
            .into_iter()
            .map(|c| (c.serial.clone(), c))
            .collect();

        for thing in &things {
            report.things_checked += 1;
            let spec = thing_spec(thing);
            let mut thing_ok = true;
            match remote_things.get(&thing.name) {
                None => {
                    report.drift.push(Drift {
                        kind: "thing_missing",
                        subject: thing.name.clone(),
                        detail: String::new(),
                    });
                    thing_ok = false;
                }
                Some(remote) => {
                    if remote.thing_type != spec.thing_type || remote.attributes != spec.attributes
                    {
                        report.drift.push(Drift {
                            kind: "thing_differs",
                            subject: thing.name.clone(),
                            detail: format!(
                                "type {:?} attributes {:?} in AWS",
                                remote.thing_type, remote.attributes
                            ),
                        });
                        thing_ok = false;
                    }
                }
            }
            if !thing_ok {
                ops.push(NewMirrorOp::thing(&thing.name));
            }
            let mine = certs_by_thing
                .get(thing.name.as_str())
                .cloned()
                .unwrap_or_default();
            let principals: HashSet<String> = if thing_ok {
                match self.api.thing_principals(&thing.name).await {
                    Ok(p) => p.into_iter().collect(),
                    Err(AwsError::NotFound { .. }) => HashSet::new(),
                    Err(e) => return Err(aws(e)),
                }
            } else {
                HashSet::new()
            };
            for cert in mine {
                let Some(want) = desired(cert, &settings.rotated_status, now) else {
                    continue;
                };
                report.certificates_checked += 1;
                let (aws_id, arn) = match aws_ids.get(&cert.serial) {
                    Some(known) => (
                        known.certificate_id.as_str(),
                        Some(known.certificate_arn.clone()),
                    ),
                    None => (
                        cert.fingerprint_sha256.as_str(),
                        prefix
                            .as_deref()
                            .map(|p| certificate_arn(p, &cert.fingerprint_sha256)),
                    ),
                };
                let mut drift = Vec::new();
                match remote_certs.get(aws_id) {
                    None => drift.push(("certificate_missing", String::new())),
                    // REVOKED is final in AWS and satisfies any retired state.
                    Some(status)
                        if status != want.status.as_aws_str()
                            && !(status == "REVOKED" && want.status != AwsStatus::Active) =>
                    {
                        drift.push((
                            "certificate_status",
                            format!("{status} in AWS, {} here", want.status.as_aws_str()),
                        ))
                    }
                    Some(_) => {}
                }
                if let Some(arn) = &arn {
                    if want.attached && thing_ok && !principals.contains(arn) {
                        drift.push((
                            "principal_missing",
                            format!("not attached to {}", thing.name),
                        ));
                    }
                    if !want.attached && is_rotated(cert) && principals.contains(arn) {
                        drift.push((
                            "principal_not_detached",
                            format!("still attached to {}", thing.name),
                        ));
                    }
                    if want.policies && remote_certs.contains_key(aws_id) {
                        let local = self.registry.policies_of_certificate(&cert.serial).await?;
                        if !local.is_empty() {
                            let remote: HashSet<String> = self
                                .api
                                .attached_policies(arn)
                                .await
                                .map_err(aws)?
                                .into_iter()
                                .collect();
                            for p in local.iter().filter(|p| !remote.contains(&p.name)) {
                                drift.push(("policy_not_attached", p.name.clone()));
                            }
                        }
                    }
                }
                if !drift.is_empty() {
                    for (kind, detail) in drift {
                        report.drift.push(Drift {
                            kind,
                            subject: cert.serial.clone(),
                            detail,
                        });
                    }
                    ops.push(NewMirrorOp::certificate(&cert.thing_name, &cert.serial));
                }
            }
        }

        for policy in self.registry.list_policies().await? {
            let remote = self.api.policy_document(&policy.name).await.map_err(aws)?;
            let kind = match remote {
                None => Some("policy_missing"),
                Some(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(doc) if doc == policy.document => None,
                    _ => Some("policy_differs"),
                },
            };
            if let Some(kind) = kind {
                report.drift.push(Drift {
                    kind,
                    subject: policy.name.clone(),
                    detail: String::new(),
                });
                ops.push(NewMirrorOp::policy(&policy.name));
            }
        }
        if !dry_run && !ops.is_empty() {
            // Policies first: certificates attach them.
            ops.sort_by_key(|op| match op.kind {
                MirrorOpKind::Ca => 0,
                MirrorOpKind::Policy => 1,
                _ => 2,
            });
            self.policies_synced.lock().await.clear();
            report.queued = self.registry.queue_mirror_ops(&ops, now).await?;
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Registers `ca` with AWS IoT (default mode: with a verification certificate for the
/// account's registration code, signed by `ca`) and returns its AWS id and the ARN
/// prefix (`arn:PARTITION:iot:REGION:ACCOUNT:`) that certificate ARNs share.
pub async fn register_issuing_ca(
    api: &dyn IotApi,
    ca: &IssuingCa,
    mode: CaMode,
    now: i64,
) -> Result<(String, String), AwsError> {
    let verification = match mode {
        CaMode::SniOnly => None,
        CaMode::Default => {
            let code = api.registration_code().await?;
            let now = time::OffsetDateTime::from_unix_timestamp(now)
                .unwrap_or_else(|_| time::OffsetDateTime::now_utc());
            let cert = ca
                .issue_verification_certificate(&code, now)
                .map_err(|e| AwsError::Config(format!("verification certificate: {e}")))?;
            Some(cert.pem)
        }
    };
    let registered = api
        .register_ca(ca.issuing_cert_pem(), verification.as_deref(), mode)
        .await?;
    // arn:PARTITION:iot:REGION:ACCOUNT:cacert/ID — everything up to the resource part.
    let fields: Vec<&str> = registered.arn.splitn(6, ':').collect();
    if fields.len() != 6 || fields[0] != "arn" {
        return Err(AwsError::Permanent {
            operation: "RegisterCACertificate",
            code: "UnexpectedArn".to_owned(),
            message: format!("CA ARN {:?} is not an ARN", registered.arn),
        });
    }
    Ok((registered.id.clone(), format!("{}:", fields[..5].join(":"))))
}

/// What a certificate replaced by a confirmed rotation becomes in AWS IoT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotatedStatus {
    /// `REVOKED` (the default): AWS never lets it connect again.
    Revoked,
    /// `INACTIVE`: it may not connect, but can be reactivated in AWS.
    Inactive,
}

impl RotatedStatus {
    /// The status as AWS spells it, and as the mirror settings store it.
    pub fn as_str(self) -> &'static str {
        match self {
            RotatedStatus::Revoked => "REVOKED",
            RotatedStatus::Inactive => "INACTIVE",
        }
    }
}

/// The stored spelling of a CA mode (`default` | `sni-only`); [`ca_mode`] reads it back.
pub fn ca_mode_setting(mode: CaMode) -> &'static str {
    match mode {
        CaMode::SniOnly => "sni-only",
        _ => "default",
    }
}

/// What `aws enable` asks for.
#[derive(Debug, Clone)]
pub struct EnableMirror {
    /// AWS region, e.g. `eu-west-1`.
    pub region: String,
    /// Another endpoint than AWS's for the region (moto, LocalStack, a VPC endpoint).
    pub endpoint_url: Option<String>,
    /// How the issuing CA is registered.
    pub ca_mode: CaMode,
    /// What a certificate replaced by a confirmed rotation becomes in AWS.
    pub rotated_status: RotatedStatus,
    /// Register the issuing CA now (the default); `false` queues its registration for the
    /// mirror worker instead.
    pub register_now: bool,
}

/// What enabling the mirror did.
#[derive(Debug, Clone)]
pub struct MirrorEnabled {
    /// The settings stored.
    pub settings: MirrorSettings,
    /// The issuing CA's AWS id, when it was registered now.
    pub ca_certificate_id: Option<String>,
    /// Operations queued for what the registry already holds.
    pub queued: u64,
}

/// Why enabling the mirror failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnableMirrorError {
    /// AWS refused to register the issuing CA (credentials, region, an account that
    /// already holds the CA in DEFAULT mode): nothing was stored.
    #[error("registering the issuing CA with AWS IoT: {0}")]
    RegisterCa(#[source] AwsError),
    /// The registry could not store the settings.
    #[error(transparent)]
    Store(#[from] LifecycleError),
}

/// Enables the AWS mirror: registers the issuing CA with AWS IoT first (if AWS refuses,
/// nothing is stored), then stores the settings and queues an operation for everything the
/// registry already holds, and records the CA's AWS id.
pub async fn enable(
    registry: &dyn Registry,
    ca: &IssuingCa,
    request: &EnableMirror,
    now: i64,
) -> Result<MirrorEnabled, EnableMirrorError> {
    let registered = if request.register_now {
        let api = sdk_client(&request.region, request.endpoint_url.as_deref())
            .await
            .map_err(EnableMirrorError::RegisterCa)?;
        let registered = register_issuing_ca(api.as_ref(), ca, request.ca_mode, now)
            .await
            .map_err(EnableMirrorError::RegisterCa)?;
        Some(registered)
    } else {
        None
    };
    let settings = MirrorSettings {
        enabled: true,
        region: request.region.clone(),
        endpoint_url: request.endpoint_url.clone(),
        ca_mode: ca_mode_setting(request.ca_mode).to_owned(),
        rotated_status: request.rotated_status.as_str().to_owned(),
        ca_certificate_id: None,
        arn_prefix: None,
        updated_at: now,
    };
    let queued = registry
        .enable_mirror(&settings, now)
        .await
        .map_err(LifecycleError::from)?;
    if let Some((id, prefix)) = &registered {
        registry
            .record_mirror_ca(id, prefix, now)
            .await
            .map_err(LifecycleError::from)?;
    }
    Ok(MirrorEnabled {
        settings,
        ca_certificate_id: registered.map(|(id, _)| id),
        queued,
    })
}

/// What disabling the mirror did.
#[derive(Debug, Clone, Copy)]
pub struct MirrorDisabled {
    /// False if the mirror was not enabled.
    pub changed: bool,
    /// Queued operations kept for a later `aws enable`.
    pub pending: i64,
}

/// Disables the AWS mirror; the queue is kept, so enabling again resumes it.
pub async fn disable(registry: &dyn Registry, now: i64) -> Result<MirrorDisabled, LifecycleError> {
    let changed = registry.disable_mirror(now).await?;
    let backlog = registry.mirror_backlog(0).await?;
    Ok(MirrorDisabled {
        changed,
        pending: backlog.pending,
    })
}

/// An AWS IoT client for the stored settings (region, endpoint), on aws-sdk-iot with
/// the standard credential chain.
pub async fn connect(
    region: &str,
    endpoint_url: Option<&str>,
) -> Result<Arc<dyn IotApi>, LifecycleError> {
    Ok(sdk_client(region, endpoint_url).await?)
}

async fn sdk_client(region: &str, endpoint_url: Option<&str>) -> Result<Arc<dyn IotApi>, AwsError> {
    let client = fleetcert_aws::SdkIot::connect(&fleetcert_aws::ClientSettings {
        region: region.to_owned(),
        endpoint_url: endpoint_url.map(str::to_owned),
        ..Default::default()
    })
    .await?;
    Ok(Arc::new(client))
}

/// The stored CA mode (`default` | `sni-only`) as the client's enum.
pub fn ca_mode(setting: &str) -> CaMode {
    if setting == "sni-only" {
        CaMode::SniOnly
    } else {
        CaMode::Default
    }
}

/// Revoked by a confirmed rotation (the registry records reason `superseded`).
fn is_rotated(cert: &CertificateRecord) -> bool {
    cert.revocation_reason
        .as_deref()
        .is_some_and(|r| r.eq_ignore_ascii_case("superseded"))
}

/// What AWS should hold for `cert`; `None` if it has expired (left alone).
fn desired(cert: &CertificateRecord, rotated_status: &str, now: i64) -> Option<Desired> {
    if cert.not_after <= now {
        return None;
    }
    Some(match cert.status {
        CertStatus::Revoked if is_rotated(cert) => Desired {
            status: AwsStatus::parse(rotated_status).unwrap_or(AwsStatus::Revoked),
            attached: false,
            policies: false,
        },
        CertStatus::Revoked => Desired {
            status: AwsStatus::Revoked,
            attached: false,
            policies: false,
        },
        _ => Desired {
            status: AwsStatus::Active,
            attached: true,
            policies: true,
        },
    })
}

/// The ARN AWS gives a certificate it names by the SHA-256 of its DER: only for a
/// certificate the mirror has not registered yet (reconcile); otherwise the ARN AWS
/// returned is recorded and used.
fn certificate_arn(prefix: &str, fingerprint: &str) -> String {
    format!("{prefix}cert/{fingerprint}")
}

fn thing_spec(thing: &fleetcert_registry::ThingRecord) -> ThingSpec {
    ThingSpec {
        name: thing.name.clone(),
        thing_type: thing.details.thing_type.clone(),
        attributes: thing
            .details
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        groups: thing.details.groups.clone(),
        billing_group: thing.details.billing_group.clone(),
    }
}

/// Exponential backoff with full jitter: uniform in [d/2, d] where
/// d = min(base · 2^attempts, max). Seconds, at least 1.
fn backoff(attempts: i64, base: Duration, max: Duration) -> i64 {
    let exp = u32::try_from(attempts.clamp(0, 30)).unwrap_or(30);
    let d = (base.as_secs_f64() * 2f64.powi(exp as i32)).min(max.as_secs_f64());
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    let jitter = 0.5 + f64::from(byte[0]) / 510.0;
    ((d * jitter).round() as i64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(300);
        for _ in 0..50 {
            let first = backoff(0, base, max);
            assert_eq!(first, 1);
            let fifth = backoff(4, base, max);
            assert!((8..=16).contains(&fifth), "{fifth}");
            let late = backoff(30, base, max);
            assert!((150..=300).contains(&late), "{late}");
        }
    }

    fn cert(status: CertStatus, reason: Option<&str>) -> CertificateRecord {
        CertificateRecord {
            serial: "01".into(),
            fingerprint_sha256: "ab".into(),
            public_key_sha256: "cd".into(),
            thing_name: "t".into(),
            issuer: "CN=x".into(),
            status,
            origin: fleetcert_registry::CertOrigin::Generated,
            key_algorithm: "ecdsa-p256".into(),
            not_before: 0,
            not_after: 1000,
            created_at: 0,
            delivered_at: None,
            revoked_at: None,
            revocation_reason: reason.map(str::to_owned),
            registered_at: None,
            renew_at: 600,
            replaces: None,
            der: Vec::new(),
        }
    }

    #[test]
    fn desired_state_follows_the_registry() {
        let active = desired(&cert(CertStatus::Active, None), "REVOKED", 10).unwrap();
        assert_eq!(
            active,
            Desired {
                status: AwsStatus::Active,
                attached: true,
                policies: true
            }
        );
        let superseded = desired(&cert(CertStatus::Superseded, None), "REVOKED", 10).unwrap();
        assert_eq!(superseded.status, AwsStatus::Active);
        let rotated = desired(
            &cert(CertStatus::Revoked, Some("superseded")),
            "INACTIVE",
            10,
        )
        .unwrap();
        assert_eq!(
            rotated,
            Desired {
                status: AwsStatus::Inactive,
                attached: false,
                policies: false
            }
        );
        let revoked = desired(
            &cert(CertStatus::Revoked, Some("keyCompromise")),
            "INACTIVE",
            10,
        )
        .unwrap();
        assert_eq!(revoked.status, AwsStatus::Revoked);
        assert_eq!(
            desired(&cert(CertStatus::Active, None), "REVOKED", 1000),
            None
        );
        assert_eq!(
            certificate_arn("arn:aws:iot:r:1:", "ab"),
            "arn:aws:iot:r:1:cert/ab"
        );
    }
}
