//! AWS IoT policy evaluation: the AWS developer guide's policy examples as tables (allowed
//! and denied cases), escalation through policy variables, conditions, fleetcert's own
//! template policies, and property tests.

mod aws_examples;
mod props;
mod semantics;
mod shipped_templates;

use fleetcert_templates::{
    ArnContext, CertificateContext, ConnectionContext, Decision, DenyReason, Policy, Request,
    ThingContext,
};
use serde_json::Value;

/// The account and region of the AWS guide's examples.
pub fn aws() -> ArnContext {
    ArnContext::new("us-east-1", "123456789012")
}

/// A connection of thing `name` with client ID = thing name, its certificate's CN the same.
pub fn thing(name: &str) -> ConnectionContext {
    ConnectionContext {
        client_id: name.to_owned(),
        thing: Some(ThingContext {
            name: name.to_owned(),
            ..ThingContext::default()
        }),
        certificate: Some(CertificateContext {
            subject: fleetcert_templates::DistinguishedName {
                common_name: vec![name.to_owned()],
                ..Default::default()
            },
            ..Default::default()
        }),
    }
}

/// A connection with this client ID and no thing attached.
pub fn client(id: &str) -> ConnectionContext {
    ConnectionContext {
        client_id: id.to_owned(),
        ..ConnectionContext::default()
    }
}

pub fn policy(document: &Value) -> Policy {
    match Policy::parse(document) {
        Ok(p) => p,
        Err(e) => panic!("{e}: {document}"),
    }
}

pub fn policy_text(text: &str) -> Policy {
    match Policy::from_json(text) {
        Ok(p) => p,
        Err(e) => panic!("{e}: {text}"),
    }
}

/// Expected outcome of a table row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Allow,
    /// Denied because nothing allows it.
    Implicit,
    /// Denied by this statement (policy 0).
    DenyBy(usize),
}

pub fn decide(p: &Policy, arn: &ArnContext, ctx: &ConnectionContext, r: Request<'_>) -> Want {
    match p.evaluate(arn, ctx, &r) {
        Decision::Allow => Want::Allow,
        Decision::Deny {
            reason: DenyReason::NoMatchingAllow,
        } => Want::Implicit,
        Decision::Deny {
            reason:
                DenyReason::ExplicitDeny {
                    policy: 0,
                    statement,
                },
        } => Want::DenyBy(statement),
        other => panic!("unexpected {other:?}"),
    }
}

/// Runs a table of `(connection, request, expected)` rows against one policy.
#[track_caller]
pub fn table(p: &Policy, rows: &[(&ConnectionContext, Request<'_>, Want)]) {
    for (ctx, request, want) in rows {
        let got = decide(p, &aws(), ctx, *request);
        assert_eq!(
            got, *want,
            "{} on {:?} as client {:?}",
            request.action, request.name, ctx.client_id
        );
    }
}
