//! Group commit for the writes that devices make one at a time: first connects
//! (registrations), and the Fleet Provisioning API's certificates and RegisterThings.
//!
//! Each such write is one registry transaction. On a backend with one writer and a
//! durable commit per transaction (SQLite) those commits set the pace, not the requests;
//! so writes that arrive while one group commits wait for the next group and share its
//! commit. On a backend that runs them in parallel (PostgreSQL,
//! [`Registrations::registration_group_size`] = 1) each goes straight through.
use fleetcert_registry::{
    NewProvisional, ProvisionalOutcome, ProvisionalRegistration, Registration, RegistrationOutcome,
    Registry, RegistryError,
};
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// One kind of write that can be grouped: how to make it alone and as a group.
pub(crate) trait GroupWrite: Send + Sync + 'static {
    type Item: Send + Sync + 'static;
    type Outcome: Send + 'static;
    /// What a failed group is called in the log.
    const WHAT: &'static str;

    fn one<'a>(
        registry: &'a dyn Registry,
        item: &'a Self::Item,
    ) -> impl Future<Output = Result<Self::Outcome, RegistryError>> + Send + 'a;

    /// All of `items` in one transaction, outcomes in order; an error writes none.
    fn group<'a>(
        registry: &'a dyn Registry,
        items: &'a [Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Outcome>, RegistryError>> + Send + 'a;
}

/// A first connect's registration.
pub(crate) struct Register;

impl GroupWrite for Register {
    type Item = Registration;
    type Outcome = RegistrationOutcome;
    const WHAT: &'static str = "registrations";

    fn one<'a>(
        registry: &'a dyn Registry,
        item: &'a Registration,
    ) -> impl Future<Output = Result<RegistrationOutcome, RegistryError>> + Send + 'a {
        registry.register(item)
    }

    fn group<'a>(
        registry: &'a dyn Registry,
        items: &'a [Registration],
    ) -> impl Future<Output = Result<Vec<RegistrationOutcome>, RegistryError>> + Send + 'a {
        registry.register_batch(items)
    }
}

/// A certificate the Fleet Provisioning API issued, recorded before it is handed out.
pub(crate) struct RecordProvisional;

impl GroupWrite for RecordProvisional {
    type Item = NewProvisional;
    type Outcome = ();
    const WHAT: &'static str = "provisional certificates";

    fn one<'a>(
        registry: &'a dyn Registry,
        item: &'a NewProvisional,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send + 'a {
        registry.record_provisional(item)
    }

    async fn group(
        registry: &dyn Registry,
        items: &[NewProvisional],
    ) -> Result<Vec<()>, RegistryError> {
        registry.record_provisional_batch(items).await?;
        Ok(vec![(); items.len()])
    }
}

/// RegisterThing.
pub(crate) struct RegisterProvisional;

impl GroupWrite for RegisterProvisional {
    type Item = ProvisionalRegistration;
    type Outcome = ProvisionalOutcome;
    const WHAT: &'static str = "RegisterThings";

    fn one<'a>(
        registry: &'a dyn Registry,
        item: &'a ProvisionalRegistration,
    ) -> impl Future<Output = Result<ProvisionalOutcome, RegistryError>> + Send + 'a {
        registry.register_provisional(item)
    }

    fn group<'a>(
        registry: &'a dyn Registry,
        items: &'a [ProvisionalRegistration],
    ) -> impl Future<Output = Result<Vec<ProvisionalOutcome>, RegistryError>> + Send + 'a {
        registry.register_provisional_batch(items)
    }
}

type Reply<W> = oneshot::Sender<Result<<W as GroupWrite>::Outcome, RegistryError>>;

/// Hands writes of one kind to the registry, grouped when the backend wants it.
pub(crate) struct Grouped<W: GroupWrite> {
    registry: Arc<dyn Registry>,
    groups: Option<mpsc::Sender<(W::Item, Reply<W>)>>,
}

impl<W: GroupWrite> Grouped<W> {
    /// Starts the grouping task (on the current tokio runtime) if the backend groups.
    /// The task ends when this value is dropped.
    pub(crate) fn new(registry: Arc<dyn Registry>) -> Self {
        let group_size = registry.registration_group_size();
        let groups = (group_size > 1).then(|| {
            let (sender, receiver) = mpsc::channel(group_size * 4);
            tokio::spawn(commit_groups::<W>(registry.clone(), receiver, group_size));
            sender
        });
        Grouped { registry, groups }
    }

    pub(crate) async fn write(&self, item: W::Item) -> Result<W::Outcome, RegistryError> {
        let Some(groups) = &self.groups else {
            return W::one(&*self.registry, &item).await;
        };
        let (reply, answer) = oneshot::channel();
        let stopped = || RegistryError::Interrupted("the group commit task stopped");
        groups.send((item, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Takes whatever writes are waiting (up to `group_size`) and commits them as one group;
/// a group that fails as a whole is retried one by one, so one bad write cannot fail the
/// others.
async fn commit_groups<W: GroupWrite>(
    registry: Arc<dyn Registry>,
    mut receiver: mpsc::Receiver<(W::Item, Reply<W>)>,
    group_size: usize,
) {
    let mut waiting = Vec::with_capacity(group_size);
    while receiver.recv_many(&mut waiting, group_size).await > 0 {
        let (items, replies): (Vec<W::Item>, Vec<Reply<W>>) = waiting.drain(..).unzip();
        let outcomes = if items.len() == 1 {
            vec![W::one(&*registry, &items[0]).await]
        } else {
            match W::group(&*registry, &items).await {
                Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
                Err(e) => {
                    tracing::warn!(
                        group = items.len(),
                        "a group of {} failed ({e}); writing one by one",
                        W::WHAT
                    );
                    let mut outcomes = Vec::with_capacity(items.len());
                    for item in &items {
                        outcomes.push(W::one(&*registry, item).await);
                    }
                    outcomes
                }
            }
        };
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // The requester may have gone; its write stands.
            let _ = reply.send(outcome);
        }
    }
}
