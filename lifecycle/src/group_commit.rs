//! Group commit for first connects.
//!
//! Every first connect is one registry transaction. On a backend with one writer and a
//! durable commit per transaction (SQLite) those commits set the pace, not the
//! handshakes; so registrations that arrive while one group commits wait for the next
//! group and share its commit. On a backend that runs registrations in parallel
//! (PostgreSQL, [`Registrations::registration_group_size`] = 1) each goes straight through.
use fleetcert_registry::{Registration, RegistrationOutcome, Registry, RegistryError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

type Reply = oneshot::Sender<Result<RegistrationOutcome, RegistryError>>;

/// Hands registrations to the registry, grouped when the backend wants it.
pub(crate) struct Registrations {
    registry: Arc<dyn Registry>,
    groups: Option<mpsc::Sender<(Registration, Reply)>>,
}

impl Registrations {
    /// Starts the grouping task (on the current tokio runtime) if the backend groups.
    /// The task ends when this value is dropped.
    pub(crate) fn new(registry: Arc<dyn Registry>) -> Self {
        let group_size = registry.registration_group_size();
        let groups = (group_size > 1).then(|| {
            let (sender, receiver) = mpsc::channel(group_size * 4);
            tokio::spawn(commit_groups(registry.clone(), receiver, group_size));
            sender
        });
        Registrations { registry, groups }
    }

    pub(crate) async fn register(
        &self,
        registration: Registration,
    ) -> Result<RegistrationOutcome, RegistryError> {
        let Some(groups) = &self.groups else {
            return self.registry.register(&registration).await;
        };
        let (reply, answer) = oneshot::channel();
        let stopped = || RegistryError::Interrupted("the registration task stopped");
        groups
            .send((registration, reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Takes whatever registrations are waiting (up to `group_size`) and commits them as one
/// group; a group that fails as a whole is retried one by one, so one bad registration
/// cannot fail the others.
async fn commit_groups(
    registry: Arc<dyn Registry>,
    mut receiver: mpsc::Receiver<(Registration, Reply)>,
    group_size: usize,
) {
    let mut waiting = Vec::with_capacity(group_size);
    while receiver.recv_many(&mut waiting, group_size).await > 0 {
        let (registrations, replies): (Vec<Registration>, Vec<Reply>) = waiting.drain(..).unzip();
        let outcomes = if registrations.len() == 1 {
            vec![registry.register(&registrations[0]).await]
        } else {
            match registry.register_batch(&registrations).await {
                Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
                Err(e) => {
                    tracing::warn!(
                        group = registrations.len(),
                        "a group of registrations failed ({e}); registering one by one"
                    );
                    let mut outcomes = Vec::with_capacity(registrations.len());
                    for registration in &registrations {
                        outcomes.push(registry.register(registration).await);
                    }
                    outcomes
                }
            }
        };
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // The connection may have gone; its registration stands.
            let _ = reply.send(outcome);
        }
    }
}
