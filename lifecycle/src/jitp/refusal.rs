//! Why a device request is refused, independent of the transport that carries it.
//!
//! Each variant has a stable reason code ([`Refusal::code`]): the metrics label and the
//! `error` field a device logs. A front end maps the variant to its own vocabulary (an
//! HTTP status, an MQTT reason code); lifecycle never does.

/// Why a device is refused. The message is for humans; [`Refusal::code`] is stable.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// `certificate_unreadable`: the certificate cannot be parsed.
    CertificateUnreadable(String),
    /// `certificate_expired`: past notAfter (or past the renew-after-expiry window).
    CertificateExpired(String),
    /// `invalid_thing_name`: the common name is not a valid thing name.
    InvalidThingName(String),
    /// `unknown_certificate`: the certificate is not in the registry.
    UnknownCertificate(String),
    /// `certificate_revoked`: the certificate is revoked.
    CertificateRevoked(String),
    /// `certificate_not_active`: neither active nor superseded (and not registered).
    CertificateNotActive(String),
    /// `template_failed`: the thing's template cannot be rendered for this device.
    TemplateFailed(String),
    /// `registration_refused`: the registry refused the registration.
    RegistrationRefused(String),
    /// `registry_busy`: the record kept changing under the request; try again.
    RegistryBusy(String),
    /// `registry_unavailable`: the registry cannot be reached; try again later.
    RegistryUnavailable,
    /// `csr_invalid`: the re-enrollment body is not an acceptable PKCS#10 CSR (the
    /// device's request is malformed).
    CsrInvalid(String),
    /// `csr_wrong_thing`: the CSR names another thing than the certificate.
    CsrWrongThing(String),
    /// `wrong_thing`: the replacement names another thing than the certificate.
    WrongThing(String),
    /// `key_reused`: the replacement reuses a key fleetcert has seen.
    KeyReused(String),
    /// `replacement_pending`: a replacement is waiting to be fetched; take that one.
    ReplacementPending(String),
    /// `replacement_limit`: this certificate got as many replacements as it may.
    ReplacementLimit(String),
    /// Another refusal of the registry's replacement flow, with the registry's code.
    ReplacementRefused {
        /// The registry's stable code.
        code: &'static str,
        /// Why, for humans.
        message: String,
    },
    /// `use_est`: the device made its own key, so it re-enrolls with a CSR (EST) rather
    /// than fetching a replacement key.
    UseEst,
    /// `rotation_not_due`: no replacement is waiting and rotation is not due yet.
    RotationNotDue(String),
    /// `issuance_failed`: the server could not sign (its fault; retry).
    IssuanceFailed,
    /// `replacement_unreadable`: a sealed replacement key cannot be opened (its fault).
    ReplacementUnreadable,
    /// `sealing_failed`: a generated key could not be sealed (its fault).
    SealingFailed,
    /// `unknown_issuer`: the certificate does not chain to the fleet's issuing CA.
    UnknownIssuer(String),
    /// `certificate_invalid`: path validation failed for another reason than the issuer
    /// or expiry (not yet valid, bad signature, not for client authentication…).
    CertificateInvalid(String),
    /// `client_id_mismatch`: the certificate's policies do not allow `iot:Connect` with
    /// this client ID, which is not the name of the thing the certificate is attached to.
    ClientIdMismatch(String),
    /// `connect_denied`: the certificate's policies do not allow `iot:Connect` with this
    /// client ID (an explicit deny, or no statement allows it).
    ConnectDenied(String),
    /// `policy_invalid`: a policy attached to the certificate cannot be evaluated (the
    /// server's data is at fault; refused rather than judged without that policy).
    PolicyInvalid(String),
}

impl Refusal {
    /// The stable reason code (metrics label, JSON `error`).
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::CertificateUnreadable(_) => "certificate_unreadable",
            Refusal::CertificateExpired(_) => "certificate_expired",
            Refusal::InvalidThingName(_) => "invalid_thing_name",
            Refusal::UnknownCertificate(_) => "unknown_certificate",
            Refusal::CertificateRevoked(_) => "certificate_revoked",
            Refusal::CertificateNotActive(_) => "certificate_not_active",
            Refusal::TemplateFailed(_) => "template_failed",
            Refusal::RegistrationRefused(_) => "registration_refused",
            Refusal::RegistryBusy(_) => "registry_busy",
            Refusal::RegistryUnavailable => "registry_unavailable",
            Refusal::CsrInvalid(_) => "csr_invalid",
            Refusal::CsrWrongThing(_) => "csr_wrong_thing",
            Refusal::WrongThing(_) => "wrong_thing",
            Refusal::KeyReused(_) => "key_reused",
            Refusal::ReplacementPending(_) => "replacement_pending",
            Refusal::ReplacementLimit(_) => "replacement_limit",
            Refusal::ReplacementRefused { code, .. } => code,
            Refusal::UseEst => "use_est",
            Refusal::RotationNotDue(_) => "rotation_not_due",
            Refusal::IssuanceFailed => "issuance_failed",
            Refusal::ReplacementUnreadable => "replacement_unreadable",
            Refusal::SealingFailed => "sealing_failed",
            Refusal::UnknownIssuer(_) => "unknown_issuer",
            Refusal::CertificateInvalid(_) => "certificate_invalid",
            Refusal::ClientIdMismatch(_) => "client_id_mismatch",
            Refusal::ConnectDenied(_) => "connect_denied",
            Refusal::PolicyInvalid(_) => "policy_invalid",
        }
    }

    /// Why, for humans (a device logs it).
    pub fn message(&self) -> String {
        match self {
            Refusal::CertificateUnreadable(m)
            | Refusal::CertificateExpired(m)
            | Refusal::InvalidThingName(m)
            | Refusal::UnknownCertificate(m)
            | Refusal::CertificateRevoked(m)
            | Refusal::CertificateNotActive(m)
            | Refusal::TemplateFailed(m)
            | Refusal::RegistrationRefused(m)
            | Refusal::RegistryBusy(m)
            | Refusal::CsrInvalid(m)
            | Refusal::CsrWrongThing(m)
            | Refusal::WrongThing(m)
            | Refusal::KeyReused(m)
            | Refusal::ReplacementPending(m)
            | Refusal::ReplacementLimit(m)
            | Refusal::RotationNotDue(m)
            | Refusal::UnknownIssuer(m)
            | Refusal::CertificateInvalid(m)
            | Refusal::ClientIdMismatch(m)
            | Refusal::ConnectDenied(m)
            | Refusal::PolicyInvalid(m)
            | Refusal::ReplacementRefused { message: m, .. } => m.clone(),
            Refusal::RegistryUnavailable => "the registry is unavailable; try again later".into(),
            Refusal::UseEst => {
                "this device made its own key: send a CSR for a new key (EST re-enrollment)".into()
            }
            Refusal::IssuanceFailed | Refusal::ReplacementUnreadable | Refusal::SealingFailed => {
                format!(
                    "the server could not complete the request ({})",
                    self.code()
                )
            }
        }
    }

    /// The server, not the device, is at fault (database down, signing failed): the
    /// same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Refusal::RegistryBusy(_)
                | Refusal::RegistryUnavailable
                | Refusal::IssuanceFailed
                | Refusal::ReplacementUnreadable
                | Refusal::SealingFailed
        )
    }

    /// The server's own failure: `code` names it, the cause is logged, not told.
    pub(crate) fn internal(refusal: Refusal, e: impl std::fmt::Display) -> Self {
        tracing::error!("{}: {e}", refusal.code());
        refusal
    }

    /// The registry failed during a device request.
    pub(crate) fn unavailable(e: impl std::fmt::Display) -> Self {
        tracing::warn!("registry unavailable during a device request: {e}");
        Refusal::RegistryUnavailable
    }

    /// A refusal of [`fleetcert_registry::Rotations::replace_certificate`], by its code.
    pub(crate) fn of_replacement(code: &'static str, message: String) -> Self {
        match code {
            "unknown_certificate" => Refusal::UnknownCertificate(message),
            "certificate_revoked" => Refusal::CertificateRevoked(message),
            "wrong_thing" => Refusal::WrongThing(message),
            "key_reused" => Refusal::KeyReused(message),
            "replacement_pending" => Refusal::ReplacementPending(message),
            "replacement_limit" => Refusal::ReplacementLimit(message),
            code => Refusal::ReplacementRefused { code, message },
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacement_codes_round_trip() {
        for code in [
            "unknown_certificate",
            "certificate_revoked",
            "wrong_thing",
            "key_reused",
            "replacement_pending",
            "replacement_limit",
            "something_new",
        ] {
            let refusal = Refusal::of_replacement(code, "why".into());
            assert_eq!(refusal.code(), code);
            assert_eq!(refusal.message(), "why");
            assert!(!refusal.is_retryable());
        }
        assert!(Refusal::RegistryUnavailable.is_retryable());
        assert_eq!(
            Refusal::IssuanceFailed.message(),
            "the server could not complete the request (issuance_failed)"
        );
    }
}
