//! Turning SDK errors into [`AwsError`]s: the one classification every call goes through.

use std::error::Error as StdError;

use aws_credential_types::provider::error::CredentialsError;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::AwsError;

/// Classifies a failed SDK call.
///
/// - no response (connection refused/reset, DNS, TLS), timeout, unparsable response → Transient;
/// - service errors by code and HTTP status, see [`classify_service`];
/// - the credentials chain failing: no credentials found / bad credentials configuration →
///   Config, a credentials provider timing out or failing (IMDS, STS down) → Transient;
/// - a request the SDK refused to build → Permanent.
pub(crate) fn classify<E>(operation: &'static str, err: SdkError<E, HttpResponse>) -> AwsError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    if let Some(credentials) = find_in_chain::<CredentialsError>(&err) {
        return classify_credentials(operation, credentials, &err);
    }
    match &err {
        SdkError::ServiceError(ctx) => {
            let service = ctx.err();
            let status = ctx.raw().status().as_u16();
            let message = match service.message() {
                Some(message) if !message.is_empty() => message.to_owned(),
                _ => error_chain(service),
            };
            classify_service(operation, service.code(), status, message)
        }
        SdkError::ConstructionFailure(_) => AwsError::Permanent {
            operation,
            code: "ConstructionFailure".to_owned(),
            message: error_chain(&err),
        },
        SdkError::TimeoutError(_) => AwsError::Transient {
            operation,
            message: format!("timed out: {}", error_chain(&err)),
        },
        // DispatchFailure, ResponseError and whatever future SDKs add.
        _ => AwsError::Transient {
            operation,
            message: error_chain(&err),
        },
    }
}

/// Classifies an error answer from AWS by its error code and HTTP status.
pub(crate) fn classify_service(
    operation: &'static str,
    code: Option<&str>,
    status: u16,
    message: String,
) -> AwsError {
    const TRANSIENT_CODES: &[&str] = &[
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "ServiceUnavailableException",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
    ];
    const SERVER_CODES: &[&str] = &[
        "InternalFailureException",
        "InternalFailure",
        "InternalServerException",
        "InternalError",
    ];
    match code {
        Some(code) if TRANSIENT_CODES.contains(&code) => {
            return AwsError::Transient {
                operation,
                message: format!("{code}: {message}"),
            };
        }
        Some(code) if SERVER_CODES.contains(&code) => {
            return AwsError::ServerError {
                operation,
                message: format!("{code}: {message}"),
            };
        }
        Some("ResourceNotFoundException") => return AwsError::NotFound { operation, message },
        _ => {}
    }
    match status {
        // Rate limited, bad gateway, unavailable, gateway timeout: the service or the path to it
        // is having a bad moment.
        429 | 502 | 503 | 504 => AwsError::Transient {
            operation,
            message: with_code(code, status, message),
        },
        500..=599 => AwsError::ServerError {
            operation,
            message: with_code(code, status, message),
        },
        _ => AwsError::Permanent {
            operation,
            code: code.map_or_else(|| format!("HTTP {status}"), str::to_owned),
            message,
        },
    }
}

fn with_code(code: Option<&str>, status: u16, message: String) -> String {
    match code {
        Some(code) => format!("{code} (HTTP {status}): {message}"),
        None => format!("HTTP {status}: {message}"),
    }
}

fn classify_credentials(
    operation: &'static str,
    credentials: &CredentialsError,
    err: &(dyn StdError + 'static),
) -> AwsError {
    let detail = error_chain(err);
    match credentials {
        CredentialsError::ProviderTimedOut(_) | CredentialsError::ProviderError(_) => {
            AwsError::Transient {
                operation,
                message: format!("could not load AWS credentials: {detail}"),
            }
        }
        CredentialsError::CredentialsNotLoaded(_) => AwsError::Config(format!(
            "{operation}: AWS credentials are missing (none found in the environment, profile, \
             web identity or instance metadata): {detail}"
        )),
        CredentialsError::InvalidConfiguration(_) => AwsError::Config(format!(
            "{operation}: the AWS credentials configuration is invalid: {detail}"
        )),
        _ => AwsError::Config(format!("{operation}: AWS credentials unusable: {detail}")),
    }
}

/// `err` and its sources, `: `-separated, skipping a source whose text its parent already
/// shows.
pub(crate) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut current = err.source();
    while let Some(e) = current {
        let text = e.to_string();
        if !text.is_empty() && !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        current = e.source();
    }
    out
}

/// The first error of type `T` in `err`'s source chain (`err` included).
fn find_in_chain<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_iot::operation::update_certificate::UpdateCertificateError;
    use aws_sdk_iot::types::error::{
        InternalFailureException, ResourceNotFoundException, ThrottlingException,
    };
    use aws_smithy_runtime_api::client::result::ConnectorError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;
    use aws_smithy_types::error::ErrorMetadata;

    fn meta(code: &str, message: &str) -> ErrorMetadata {
        ErrorMetadata::builder().code(code).message(message).build()
    }

    fn raw(status: u16) -> HttpResponse {
        Response::new(StatusCode::try_from(status).unwrap(), SdkBody::empty())
    }

    type UpdateErr = SdkError<UpdateCertificateError, HttpResponse>;

    #[test]
    fn service_errors_by_code() {
        let not_found: UpdateErr = SdkError::service_error(
            UpdateCertificateError::ResourceNotFoundException(
                ResourceNotFoundException::builder()
                    .message("no such cert")
                    .meta(meta("ResourceNotFoundException", "no such cert"))
                    .build(),
            ),
            raw(404),
        );
        match classify("UpdateCertificate", not_found) {
            AwsError::NotFound { operation, message } => {
                assert_eq!(operation, "UpdateCertificate");
                assert_eq!(message, "no such cert");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }

        let throttled: UpdateErr = SdkError::service_error(
            UpdateCertificateError::ThrottlingException(
                ThrottlingException::builder()
                    .message("slow down")
                    .meta(meta("ThrottlingException", "slow down"))
                    .build(),
            ),
            raw(400),
        );
        assert!(matches!(
            classify("UpdateCertificate", throttled),
            AwsError::Transient { .. }
        ));

        let internal: UpdateErr = SdkError::service_error(
            UpdateCertificateError::InternalFailureException(
                InternalFailureException::builder()
                    .message("oops")
                    .meta(meta("InternalFailureException", "oops"))
                    .build(),
            ),
            raw(500),
        );
        assert!(matches!(
            classify("UpdateCertificate", internal),
            AwsError::ServerError { .. }
        ));

        let unhandled: UpdateErr = SdkError::service_error(
            UpdateCertificateError::generic(meta("SomethingNewException", "new")),
            raw(400),
        );
        match classify("UpdateCertificate", unhandled) {
            AwsError::Permanent { code, message, .. } => {
                assert_eq!(code, "SomethingNewException");
                assert_eq!(message, "new");
            }
            other => panic!("expected Permanent, got {other:?}"),
        }
    }

    #[test]
    fn service_errors_by_status() {
        let cases = [
            (None, 429, "Transient"),
            (None, 503, "Transient"),
            (Some("ServiceUnavailableException"), 503, "Transient"),
            (None, 500, "ServerError"),
            (None, 501, "ServerError"),
            (Some("ResourceNotFoundException"), 404, "NotFound"),
            (None, 404, "Permanent"),
            (Some("InvalidRequestException"), 400, "Permanent"),
            (Some("UnauthorizedException"), 401, "Permanent"),
            (Some("LimitExceededException"), 410, "Permanent"),
        ];
        for (code, status, want) in cases {
            let got = classify_service("Op", code, status, "m".into());
            let kind = match &got {
                AwsError::Transient { .. } => "Transient",
                AwsError::ServerError { .. } => "ServerError",
                AwsError::NotFound { .. } => "NotFound",
                AwsError::Permanent { .. } => "Permanent",
                AwsError::Config(_) => "Config",
            };
            assert_eq!(kind, want, "{code:?} {status}: {got:?}");
        }
        match classify_service("Op", None, 404, "m".into()) {
            AwsError::Permanent { code, .. } => assert_eq!(code, "HTTP 404"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_response_is_transient() {
        let io: UpdateErr = SdkError::dispatch_failure(ConnectorError::io(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into(),
        ));
        assert!(matches!(classify("Op", io), AwsError::Transient { .. }));
        let timeout: UpdateErr = SdkError::timeout_error("too slow");
        assert!(matches!(
            classify("Op", timeout),
            AwsError::Transient { .. }
        ));
        let garbled: UpdateErr = SdkError::response_error("bad json", raw(200));
        assert!(matches!(
            classify("Op", garbled),
            AwsError::Transient { .. }
        ));
        let unbuildable: UpdateErr = SdkError::construction_failure("missing field");
        assert!(matches!(
            classify("Op", unbuildable),
            AwsError::Permanent { .. }
        ));
    }

    #[test]
    fn credentials_errors() {
        let missing: UpdateErr = SdkError::dispatch_failure(ConnectorError::other(
            Box::new(CredentialsError::not_loaded(
                "no providers in chain provided credentials",
            )),
            None,
        ));
        match classify("ListThings", missing) {
            AwsError::Config(message) => {
                assert!(message.contains("credentials are missing"), "{message}")
            }
            other => panic!("expected Config, got {other:?}"),
        }
        let timed_out: UpdateErr = SdkError::dispatch_failure(ConnectorError::other(
            Box::new(CredentialsError::provider_timed_out(
                std::time::Duration::from_secs(5),
            )),
            None,
        ));
        assert!(matches!(
            classify("ListThings", timed_out),
            AwsError::Transient { .. }
        ));
    }
}
