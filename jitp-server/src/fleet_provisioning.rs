//! The AWS IoT Fleet Provisioning MQTT API's wire format, for the broker API's
//! `POST /broker/v1/provision`: which operation a request topic names, its JSON or CBOR
//! payload, and the `accepted` / `rejected` reply (topic and payload), as AWS documents
//! them. The operations themselves are lifecycle's ([`Jitp`]).
use base64::Engine as _;
use fleetcert_lifecycle::jitp::{Jitp, ProvisioningError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The request payload limit (AWS IoT's MQTT message limit is 128 KiB).
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// A payload encoding, named by the last topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// `json`.
    Json,
    /// `cbor`.
    Cbor,
}

/// The operation a request topic names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// `$aws/certificates/create/<format>`.
    CreateKeysAndCertificate,
    /// `$aws/certificates/create-from-csr/<format>`.
    CreateCertificateFromCsr,
    /// `$aws/provisioning-templates/<name>/provision/<format>`.
    RegisterThing {
        /// The template named in the topic.
        template: String,
    },
}

/// Reads a request topic: the operation and the encoding, or `None` for any other
/// topic (replies included).
pub fn parse_topic(topic: &str) -> Option<(Operation, Encoding)> {
    let encoding = |s: &str| match s {
        "json" => Some(Encoding::Json),
        "cbor" => Some(Encoding::Cbor),
        _ => None,
    };
    let levels: Vec<&str> = topic.split('/').collect();
    match levels.as_slice() {
        ["$aws", "certificates", "create", format] => {
            Some((Operation::CreateKeysAndCertificate, encoding(format)?))
        }
        ["$aws", "certificates", "create-from-csr", format] => {
            Some((Operation::CreateCertificateFromCsr, encoding(format)?))
        }
        [
            "$aws",
            "provisioning-templates",
            template,
            "provision",
            format,
        ] if !template.is_empty() => Some((
            Operation::RegisterThing {
                template: (*template).to_owned(),
            },
            encoding(format)?,
        )),
        _ => None,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateFromCsrRequest {
    certificate_signing_request: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RegisterThingRequest {
    certificate_ownership_token: String,
    #[serde(default)]
    parameters: BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreateAccepted<'a> {
    certificate_id: &'a str,
    certificate_pem: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key: Option<&'a str>,
    certificate_ownership_token: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RegisterAccepted<'a> {
    thing_name: &'a str,
    device_configuration: &'a BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Rejected<'a> {
    status_code: u16,
    error_code: &'a str,
    error_message: &'a str,
}

/// The Fleet Provisioning `statusCode` of a refusal (AWS's HTTP-like classes).
pub fn status_code(error: &ProvisioningError) -> u16 {
    match error {
        ProvisioningError::InvalidPayload(_)
        | ProvisioningError::InvalidCsr(_)
        | ProvisioningError::TokenInvalid(_)
        | ProvisioningError::TokenExpired(_)
        | ProvisioningError::TemplateFailed(_) => 400,
        ProvisioningError::TokenNotYours(_)
        | ProvisioningError::TemplateNotAllowed(_)
        | ProvisioningError::ClaimRevoked(_)
        | ProvisioningError::ClaimExhausted(_)
        | ProvisioningError::ProvisioningRefused(_) => 403,
        ProvisioningError::TemplateNotFound(_) => 404,
        ProvisioningError::TokenUsed(_) => 409,
        ProvisioningError::Unavailable(_) => 503,
        _ => 500,
    }
}

fn decode<T: for<'de> Deserialize<'de>>(
    payload: &[u8],
    encoding: Encoding,
) -> Result<T, ProvisioningError> {
    match encoding {
        Encoding::Json => serde_json::from_slice(payload)
            .map_err(|e| ProvisioningError::InvalidPayload(format!("not the expected JSON: {e}"))),
        Encoding::Cbor => ciborium::from_reader(payload)
            .map_err(|e| ProvisioningError::InvalidPayload(format!("not the expected CBOR: {e}"))),
    }
}

fn encode<T: Serialize>(value: &T, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Json => serde_json::to_vec(value).unwrap_or_default(),
        Encoding::Cbor => {
            let mut out = Vec::new();
            // Writing to a Vec fails only for values serde cannot represent.
            let _ = ciborium::into_writer(value, &mut out);
            out
        }
    }
}

/// One reply: the topic (`<request topic>/accepted|rejected`) and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Where to publish it (to the asking client only).
    pub topic: String,
    /// The encoded payload.
    pub payload: Vec<u8>,
    /// The `errorCode` when rejected (for logs and metrics).
    pub error_code: Option<&'static str>,
    /// After an accepted RegisterThing: the device's certificate (DER) and thing name,
    /// so the broker can be told ahead how the device's next CONNECT is answered.
    pub registered: Option<(Vec<u8>, String)>,
}

fn rejected(topic: &str, encoding: Encoding, error: &ProvisioningError) -> Reply {
    Reply {
        topic: format!("{topic}/rejected"),
        payload: encode(
            &Rejected {
                status_code: status_code(error),
                error_code: error.code(),
                error_message: error.message(),
            },
            encoding,
        ),
        error_code: Some(error.code()),
        registered: None,
    }
}

/// Answers one request published by the holder of the claim certificate with
/// `claim_fingerprint`, in broker session `session`. `None`: the topic is not a
/// request (nothing to answer).
pub async fn answer(
    jitp: &Jitp,
    claim_fingerprint: &str,
    session: &str,
    topic: &str,
    payload: &[u8],
) -> Option<Reply> {
    let (operation, encoding) = parse_topic(topic)?;
    let result = async {
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(ProvisioningError::InvalidPayload(format!(
                "payloads are limited to {MAX_PAYLOAD_BYTES} bytes"
            )));
        }
        match operation {
            Operation::CreateKeysAndCertificate => {
                let created = jitp
                    .create_provisional_certificate(claim_fingerprint, session, None)
                    .await?;
                Ok((
                    encode(
                        &CreateAccepted {
                            certificate_id: &created.certificate_id,
                            certificate_pem: &created.certificate_pem,
                            private_key: created.private_key_pem.as_ref().map(|k| k.as_str()),
                            certificate_ownership_token: &created.ownership_token,
                        },
                        encoding,
                    ),
                    None,
                ))
            }
            Operation::CreateCertificateFromCsr => {
                let request: CreateFromCsrRequest = decode(payload, encoding)?;
                let created = jitp
                    .create_provisional_certificate(
                        claim_fingerprint,
                        session,
                        Some(&request.certificate_signing_request),
                    )
                    .await?;
                Ok((
                    encode(
                        &CreateAccepted {
                            certificate_id: &created.certificate_id,
                            certificate_pem: &created.certificate_pem,
                            private_key: None,
                            certificate_ownership_token: &created.ownership_token,
                        },
                        encoding,
                    ),
                    None,
                ))
            }
            Operation::RegisterThing { template } => {
                let request: RegisterThingRequest = decode(payload, encoding)?;
                let thing = jitp
                    .register_provisioned_thing(
                        claim_fingerprint,
                        session,
                        &template,
                        &request.certificate_ownership_token,
                        &request.parameters,
                    )
                    .await?;
                Ok((
                    encode(
                        &RegisterAccepted {
                            thing_name: &thing.thing_name,
                            device_configuration: &thing.device_configuration,
                        },
                        encoding,
                    ),
                    Some((thing.certificate_der.clone(), thing.thing_name.clone())),
                ))
            }
        }
    }
    .await;
    Some(match result {
        Ok((payload, registered)) => Reply {
            topic: format!("{topic}/accepted"),
            payload,
            error_code: None,
            registered,
        },
        Err(error) => rejected(topic, encoding, &error),
    })
}

/// Base64 (standard) for the broker API's JSON.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Base64 (standard) from the broker API's JSON.
pub fn unb64(text: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_topics_are_recognised_and_replies_are_not() {
        assert_eq!(
            parse_topic("$aws/certificates/create/json"),
            Some((Operation::CreateKeysAndCertificate, Encoding::Json))
        );
        assert_eq!(
            parse_topic("$aws/certificates/create-from-csr/cbor"),
            Some((Operation::CreateCertificateFromCsr, Encoding::Cbor))
        );
        assert_eq!(
            parse_topic("$aws/provisioning-templates/sensors/provision/json"),
            Some((
                Operation::RegisterThing {
                    template: "sensors".into()
                },
                Encoding::Json
            ))
        );
        for other in [
            "$aws/certificates/create/json/accepted",
            "$aws/certificates/create/xml",
            "$aws/provisioning-templates//provision/json",
            "devices/a/telemetry",
        ] {
            assert_eq!(parse_topic(other), None, "{other}");
        }
    }

    #[test]
    fn rejections_carry_aws_fields_in_both_encodings() {
        let error = ProvisioningError::TokenUsed("spent".into());
        let json = rejected("$aws/x/json", Encoding::Json, &error);
        assert_eq!(json.topic, "$aws/x/json/rejected");
        let v: serde_json::Value = serde_json::from_slice(&json.payload).unwrap();
        assert_eq!(v["statusCode"], 409);
        assert_eq!(v["errorCode"], "CertificateOwnershipTokenUsed");
        assert_eq!(v["errorMessage"], "spent");
        let cbor = rejected("$aws/x/cbor", Encoding::Cbor, &error);
        let v: serde_json::Value = ciborium::from_reader(cbor.payload.as_slice()).unwrap();
        assert_eq!(v["errorCode"], "CertificateOwnershipTokenUsed");
    }

    #[test]
    fn requests_decode_from_cbor() {
        let mut bytes = Vec::new();
        ciborium::into_writer(
            &serde_json::json!({
                "certificateOwnershipToken": "t",
                "parameters": { "SerialNumber": "42" }
            }),
            &mut bytes,
        )
        .unwrap();
        let request: RegisterThingRequest = decode(&bytes, Encoding::Cbor).unwrap();
        assert_eq!(request.certificate_ownership_token, "t");
        assert_eq!(request.parameters["SerialNumber"], "42");
    }
}
