//! The device side of the AWS IoT Fleet Provisioning MQTT API (JSON), as the AWS IoT
//! Device SDKs run it with a claim certificate: subscribe to the replies, create a
//! certificate (from a CSR, or with a key made by the server), register the thing with
//! the certificate's ownership token and the template's parameters.
use crate::{Client, ClientError};

/// How the device gets its certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create<'a> {
    /// CreateCertificateFromCsr: the device keeps its key; the CSR, PEM.
    FromCsr(&'a str),
    /// CreateKeysAndCertificate: the server makes the key and sends it.
    KeysAndCertificate,
}

impl Create<'_> {
    /// The request topic.
    pub fn topic(&self) -> &'static str {
        match self {
            Create::FromCsr(_) => "$aws/certificates/create-from-csr/json",
            Create::KeysAndCertificate => "$aws/certificates/create/json",
        }
    }
}

/// RegisterThing's request topic for `template`.
pub fn register_topic(template: &str) -> String {
    format!("$aws/provisioning-templates/{template}/provision/json")
}

/// The `accepted` and `rejected` topics of both calls, as a device subscribes to them
/// before it asks.
pub fn reply_topics(create: Create<'_>, template: &str) -> Vec<String> {
    [create.topic().to_owned(), register_topic(template)]
        .iter()
        .flat_map(|t| [format!("{t}/accepted"), format!("{t}/rejected")])
        .collect()
}

/// What the create call answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// `certificateId`.
    pub certificate_id: String,
    /// `certificatePem`.
    pub certificate_pem: String,
    /// `privateKey` (CreateKeysAndCertificate only).
    pub private_key_pem: Option<String>,
    /// `certificateOwnershipToken`.
    pub ownership_token: String,
}

/// What RegisterThing answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    /// `thingName`.
    pub thing_name: String,
    /// `deviceConfiguration`.
    pub device_configuration: serde_json::Value,
}

/// Subscribes to the replies of both calls (QoS 1); refused subscriptions are an error.
pub async fn subscribe_to_replies(
    client: &mut Client,
    create: Create<'_>,
    template: &str,
) -> Result<(), ClientError> {
    let topics = reply_topics(create, template);
    let filters: Vec<(&str, u8)> = topics.iter().map(|t| (t.as_str(), 1)).collect();
    let codes = client.subscribe(&filters).await?;
    if codes.len() != filters.len() || codes.iter().any(|c| *c > 2) {
        return Err(ClientError::Protocol(format!(
            "the reply subscriptions were not granted (SUBACK {codes:?})"
        )));
    }
    Ok(())
}

/// Publishes `request` on `topic` and waits for the reply on `topic/accepted` (returned)
/// or `topic/rejected` ([`ClientError::Rejected`]); other messages are skipped.
pub async fn request(
    client: &mut Client,
    topic: &str,
    request: &serde_json::Value,
) -> Result<serde_json::Value, ClientError> {
    let body = serde_json::to_vec(request).expect("JSON serialises");
    let accepted = format!("{topic}/accepted");
    let rejected = format!("{topic}/rejected");
    let mut early = client.publish(topic, &body).await?.into_iter();
    loop {
        let (got, payload) = match early.next() {
            Some(message) => message,
            None => client.next_message().await?,
        };
        if got != accepted && got != rejected {
            continue;
        }
        let reply: serde_json::Value = serde_json::from_slice(&payload)
            .map_err(|e| ClientError::Protocol(format!("the reply on {got} is not JSON: {e}")))?;
        if got == rejected {
            return Err(ClientError::Rejected {
                code: reply["errorCode"].as_str().unwrap_or("(none)").to_owned(),
                message: reply["errorMessage"].as_str().unwrap_or("").to_owned(),
            });
        }
        return Ok(reply);
    }
}

fn field(reply: &serde_json::Value, name: &str) -> Result<String, ClientError> {
    reply[name]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| ClientError::Protocol(format!("the accepted reply has no {name}")))
}

/// CreateCertificateFromCsr or CreateKeysAndCertificate.
pub async fn create_certificate(
    client: &mut Client,
    create: Create<'_>,
) -> Result<Created, ClientError> {
    let body = match create {
        Create::FromCsr(csr) => serde_json::json!({ "certificateSigningRequest": csr }),
        Create::KeysAndCertificate => serde_json::json!({}),
    };
    let reply = request(client, create.topic(), &body).await?;
    let private_key_pem = match create {
        Create::FromCsr(_) => None,
        Create::KeysAndCertificate => Some(field(&reply, "privateKey")?),
    };
    Ok(Created {
        certificate_id: field(&reply, "certificateId")?,
        certificate_pem: field(&reply, "certificatePem")?,
        private_key_pem,
        ownership_token: field(&reply, "certificateOwnershipToken")?,
    })
}

/// RegisterThing with the ownership token and the template's parameters.
pub async fn register_thing(
    client: &mut Client,
    template: &str,
    ownership_token: &str,
    parameters: &serde_json::Map<String, serde_json::Value>,
) -> Result<Registered, ClientError> {
    let body = serde_json::json!({
        "certificateOwnershipToken": ownership_token,
        "parameters": parameters,
    });
    let reply = request(client, &register_topic(template), &body).await?;
    Ok(Registered {
        thing_name: field(&reply, "thingName")?,
        device_configuration: reply["deviceConfiguration"].clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_aws() {
        assert_eq!(
            Create::FromCsr("x").topic(),
            "$aws/certificates/create-from-csr/json"
        );
        assert_eq!(
            Create::KeysAndCertificate.topic(),
            "$aws/certificates/create/json"
        );
        assert_eq!(
            reply_topics(Create::KeysAndCertificate, "sensors"),
            [
                "$aws/certificates/create/json/accepted",
                "$aws/certificates/create/json/rejected",
                "$aws/provisioning-templates/sensors/provision/json/accepted",
                "$aws/provisioning-templates/sensors/provision/json/rejected",
            ]
        );
    }
}
