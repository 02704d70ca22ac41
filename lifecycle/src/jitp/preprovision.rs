//! The pre-provisioning check of RegisterThing, like AWS's pre-provisioning hook: per
//! template, an optional allow-list of serial numbers (the `SerialNumber` parameter) and
//! an optional webhook that sees the request and answers `allowProvisioning` and
//! `parameterOverrides` (AWS's hook contract). Configured in
//! `<data-dir>/pre-provisioning/<template>.json`, read when the server starts:
//!
//! ```json
//! { "allowedSerialNumbers": ["SN-0001", "SN-0002"],
//!   "webhook": { "url": "http://127.0.0.1:9000/hook", "timeoutMs": 5000 } }
//! ```
//!
//! A webhook that times out, fails or answers anything but `allowProvisioning: true`
//! refuses the device. Only `http://` webhooks (a service beside the server).
use super::ProvisioningError;
use crate::LifecycleError;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::Duration;

/// Longest webhook timeout accepted (the device waits for the reply meanwhile).
const MAX_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Largest webhook answer read.
const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// Largest configuration file read.
const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    allowed_serial_numbers: Option<Vec<String>>,
    #[serde(default)]
    webhook: Option<WebhookFile>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WebhookFile {
    url: String,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// One template's check.
#[derive(Debug, Clone, Default)]
pub(crate) struct TemplateCheck {
    allowed_serial_numbers: Option<HashSet<String>>,
    webhook: Option<Webhook>,
}

#[derive(Debug, Clone)]
struct Webhook {
    url: String,
    timeout: Duration,
}

/// Every template's check, by template name.
#[derive(Debug, Default)]
pub(crate) struct PreProvisioning {
    checks: HashMap<String, TemplateCheck>,
}

/// What the webhook sees (AWS's pre-provisioning hook input).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HookRequest<'a> {
    pub claim_certificate_id: &'a str,
    pub certificate_id: &'a str,
    pub certificate_pem: &'a str,
    pub template_name: &'a str,
    pub parameters: &'a BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HookAnswer {
    allow_provisioning: bool,
    #[serde(default)]
    parameter_overrides: BTreeMap<String, String>,
}

impl PreProvisioning {
    /// Reads `dir/<template>.json` for each file there; none if the directory is missing.
    /// A file that does not parse, names an unknown field or a webhook that is not
    /// `http://` fails the start, naming the file.
    pub(crate) fn load(dir: &Path) -> Result<Self, LifecycleError> {
        let mut checks = HashMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(LifecycleError::read(dir, e)),
        };
        for entry in entries {
            let path = entry.map_err(|e| LifecycleError::read(dir, e))?.path();
            let (Some(stem), Some("json")) = (
                path.file_stem().and_then(|s| s.to_str()),
                path.extension().and_then(|e| e.to_str()),
            ) else {
                continue;
            };
            let bad = |reason: String| LifecycleError::BadFile {
                path: path.clone(),
                reason,
            };
            let meta = std::fs::metadata(&path).map_err(|e| LifecycleError::read(&path, e))?;
            if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
                return Err(bad(format!(
                    "not a regular file of at most {MAX_CONFIG_BYTES} bytes"
                )));
            }
            let text = std::fs::read(&path).map_err(|e| LifecycleError::read(&path, e))?;
            let file: ConfigFile = serde_json::from_slice(&text).map_err(|e| {
                bad(format!(
                    "not a pre-provisioning configuration ({{\"allowedSerialNumbers\": [...], \"webhook\": {{\"url\": \"http://...\", \"timeoutMs\": 5000}}}}): {e}"
                ))
            })?;
            let webhook = file
                .webhook
                .map(|w| {
                    if !w.url.starts_with("http://") {
                        return Err(bad(format!(
                            "webhook url {:?}: only http:// webhooks are supported",
                            fleetcert_templates::clip(&w.url, fleetcert_templates::MAX_ECHO_CHARS)
                        )));
                    }
                    let ms = w.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
                    if ms == 0 || ms > MAX_TIMEOUT_MS {
                        return Err(bad(format!("timeoutMs must be 1 to {MAX_TIMEOUT_MS}")));
                    }
                    Ok(Webhook {
                        url: w.url,
                        timeout: Duration::from_millis(ms),
                    })
                })
                .transpose()?;
            checks.insert(
                stem.to_owned(),
                TemplateCheck {
                    allowed_serial_numbers: file
                        .allowed_serial_numbers
                        .map(|list| list.into_iter().collect()),
                    webhook,
                },
            );
        }
        Ok(PreProvisioning { checks })
    }

    /// Runs `template`'s check: `Ok` with the parameters to render with (the webhook's
    /// overrides applied), or `ProvisioningRefused`.
    pub(crate) async fn check(
        &self,
        request: &HookRequest<'_>,
    ) -> Result<BTreeMap<String, String>, ProvisioningError> {
        let mut parameters = request.parameters.clone();
        let Some(check) = self.checks.get(request.template_name) else {
            return Ok(parameters);
        };
        if let Some(allowed) = &check.allowed_serial_numbers {
            let serial = parameters.get("SerialNumber").map(String::as_str);
            if !serial.is_some_and(|s| allowed.contains(s)) {
                return Err(ProvisioningError::ProvisioningRefused(format!(
                    "SerialNumber {:?} is not on template {:?}'s allow-list",
                    fleetcert_templates::clip(
                        serial.unwrap_or(""),
                        fleetcert_templates::MAX_ECHO_CHARS
                    ),
                    request.template_name
                )));
            }
        }
        if let Some(webhook) = &check.webhook {
            let body = serde_json::to_vec(request)
                .map_err(|e| ProvisioningError::Internal(e.to_string()))?;
            let webhook = webhook.clone();
            let answer = tokio::task::spawn_blocking(move || call(&webhook, &body))
                .await
                .map_err(|e| ProvisioningError::Internal(e.to_string()))??;
            if !answer.allow_provisioning {
                return Err(ProvisioningError::ProvisioningRefused(
                    "the pre-provisioning hook refused this device".into(),
                ));
            }
            parameters.extend(answer.parameter_overrides);
        }
        Ok(parameters)
    }
}

fn call(webhook: &Webhook, body: &[u8]) -> Result<HookAnswer, ProvisioningError> {
    let refused = |why: String| {
        ProvisioningError::ProvisioningRefused(format!("the pre-provisioning hook {why}"))
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(webhook.timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let mut response = agent
        .post(&webhook.url)
        .header("Content-Type", "application/json")
        .send(body)
        .map_err(|e| refused(format!("could not be asked: {e}")))?;
    let status = response.status().as_u16();
    if status != 200 {
        return Err(refused(format!("answered HTTP {status}")));
    }
    let text = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER_BYTES)
        .read_to_string()
        .map_err(|e| refused(format!("answer could not be read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| {
        refused(format!(
            "answer is not {{\"allowProvisioning\": bool, \"parameterOverrides\": {{...}}}}: {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(params: &'a BTreeMap<String, String>) -> HookRequest<'a> {
        HookRequest {
            claim_certificate_id: "c",
            certificate_id: "d",
            certificate_pem: "p",
            template_name: "sensors",
            parameters: params,
        }
    }

    #[tokio::test]
    async fn the_allow_list_admits_listed_serial_numbers_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("sensors.json"),
            r#"{"allowedSerialNumbers": ["001", "002"]}"#,
        )
        .unwrap();
        let checks = PreProvisioning::load(dir.path()).unwrap();
        let ok = BTreeMap::from([("SerialNumber".to_owned(), "001".to_owned())]);
        assert_eq!(checks.check(&request(&ok)).await.unwrap(), ok);
        let other = BTreeMap::from([("SerialNumber".to_owned(), "999".to_owned())]);
        assert_eq!(
            checks.check(&request(&other)).await.unwrap_err().code(),
            "ProvisioningRefused"
        );
        assert!(checks.check(&request(&BTreeMap::new())).await.is_err());
    }

    #[test]
    fn bad_configurations_fail_the_start_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t.json"), r#"{"allowList": []}"#).unwrap();
        let e = PreProvisioning::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("t.json"), "{e}");
        std::fs::write(
            dir.path().join("t.json"),
            r#"{"webhook": {"url": "https://x"}}"#,
        )
        .unwrap();
        let e = PreProvisioning::load(dir.path()).unwrap_err().to_string();
        assert!(e.contains("http://"), "{e}");
    }

    /// A one-request HTTP server answering `body`; returns its port and what it got.
    fn one_shot_server(body: &'static str) -> (u16, std::thread::JoinHandle<String>) {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&got).contains("\"parameters\"") {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            // Read the rest of the JSON body (it ends with `}}` after the parameters).
            while !String::from_utf8_lossy(&got).trim_end().ends_with('}') {
                let n = stream.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        (port, handle)
    }

    #[tokio::test]
    async fn the_webhook_decides_and_overrides_parameters() {
        let dir = tempfile::tempdir().unwrap();
        let (port, seen) = one_shot_server(
            r#"{"allowProvisioning": true, "parameterOverrides": {"Site": "lyon"}}"#,
        );
        std::fs::write(
            dir.path().join("sensors.json"),
            format!(r#"{{"webhook": {{"url": "http://127.0.0.1:{port}/hook"}}}}"#),
        )
        .unwrap();
        let checks = PreProvisioning::load(dir.path()).unwrap();
        let params = BTreeMap::from([("SerialNumber".to_owned(), "001".to_owned())]);
        let out = checks.check(&request(&params)).await.unwrap();
        assert_eq!(out["Site"], "lyon");
        assert_eq!(out["SerialNumber"], "001");
        let got = seen.join().unwrap();
        assert!(got.contains("\"claimCertificateId\":\"c\""), "{got}");
        assert!(got.contains("\"SerialNumber\":\"001\""), "{got}");

        let (port, _seen) = one_shot_server(r#"{"allowProvisioning": false}"#);
        std::fs::write(
            dir.path().join("sensors.json"),
            format!(r#"{{"webhook": {{"url": "http://127.0.0.1:{port}/hook"}}}}"#),
        )
        .unwrap();
        let checks = PreProvisioning::load(dir.path()).unwrap();
        let e = checks.check(&request(&params)).await.unwrap_err();
        assert_eq!(e.code(), "ProvisioningRefused");
    }

    #[tokio::test]
    async fn an_unreachable_webhook_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            dir.path().join("sensors.json"),
            format!(
                r#"{{"webhook": {{"url": "http://127.0.0.1:{port}/hook", "timeoutMs": 500}}}}"#
            ),
        )
        .unwrap();
        let checks = PreProvisioning::load(dir.path()).unwrap();
        let e = checks.check(&request(&BTreeMap::new())).await.unwrap_err();
        assert_eq!(e.code(), "ProvisioningRefused");
    }
}
