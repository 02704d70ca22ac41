//! RFC 5280 CRL reason codes, limited to those that make sense for device certificates.

use crate::CaError;
use std::fmt;
use std::str::FromStr;

/// Why a device certificate was revoked: the RFC 5280 §5.3.1 `CRLReason` values that
/// apply to end-entity device certificates.
///
/// Not included, and refused by [`FromStr`]: `certificateHold` (fleetcert's revocation
/// is permanent; there is no suspension and no `removeFromCRL`), `cACompromise` and
/// `aACompromise` (they describe CA and attribute-authority certificates, never a
/// device's).
///
/// [`Display`](fmt::Display) and [`RevocationReason::as_str`] give the RFC name in
/// camelCase (`keyCompromise`); parsing accepts those names in any case and with `-` or
/// `_` between the words (`key-compromise`, `KEY_COMPROMISE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RevocationReason {
    /// No reason given. CRLs carry no reasonCode extension for it (RFC 5280 §5.3.1
    /// says the extension SHOULD be absent rather than `unspecified`).
    Unspecified,
    /// The device's private key is known or suspected to be compromised.
    KeyCompromise,
    /// The device changed owner or organisation.
    AffiliationChanged,
    /// The certificate was replaced by a new one (rotation, re-provisioning).
    Superseded,
    /// The device was decommissioned.
    CessationOfOperation,
    /// The device is no longer allowed to act under this certificate.
    PrivilegeWithdrawn,
}

impl RevocationReason {
    /// Every reason fleetcert accepts, in code order.
    pub const ALL: [RevocationReason; 6] = [
        RevocationReason::Unspecified,
        RevocationReason::KeyCompromise,
        RevocationReason::AffiliationChanged,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::PrivilegeWithdrawn,
    ];

    /// The RFC 5280 name: `unspecified`, `keyCompromise`, `affiliationChanged`,
    /// `superseded`, `cessationOfOperation`, `privilegeWithdrawn`.
    pub fn as_str(self) -> &'static str {
        match self {
            RevocationReason::Unspecified => "unspecified",
            RevocationReason::KeyCompromise => "keyCompromise",
            RevocationReason::AffiliationChanged => "affiliationChanged",
            RevocationReason::Superseded => "superseded",
            RevocationReason::CessationOfOperation => "cessationOfOperation",
            RevocationReason::PrivilegeWithdrawn => "privilegeWithdrawn",
        }
    }

    /// The RFC 5280 `CRLReason` code: 0, 1, 3, 4, 5 or 9.
    pub fn code(self) -> u8 {
        match self {
            RevocationReason::Unspecified => 0,
            RevocationReason::KeyCompromise => 1,
            RevocationReason::AffiliationChanged => 3,
            RevocationReason::Superseded => 4,
            RevocationReason::CessationOfOperation => 5,
            RevocationReason::PrivilegeWithdrawn => 9,
        }
    }

    /// The reason with this `CRLReason` code, if it is one fleetcert uses.
    pub fn from_code(code: u8) -> Option<RevocationReason> {
        RevocationReason::ALL.into_iter().find(|r| r.code() == code)
    }

    pub(crate) fn to_rcgen(self) -> rcgen::RevocationReason {
        match self {
            RevocationReason::Unspecified => rcgen::RevocationReason::Unspecified,
            RevocationReason::KeyCompromise => rcgen::RevocationReason::KeyCompromise,
            RevocationReason::AffiliationChanged => rcgen::RevocationReason::AffiliationChanged,
            RevocationReason::Superseded => rcgen::RevocationReason::Superseded,
            RevocationReason::CessationOfOperation => rcgen::RevocationReason::CessationOfOperation,
            RevocationReason::PrivilegeWithdrawn => rcgen::RevocationReason::PrivilegeWithdrawn,
        }
    }
}

impl fmt::Display for RevocationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lowercase with `-` and `_` removed: `Key-Compromise` → `keycompromise`.
fn fold(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl FromStr for RevocationReason {
    type Err = CaError;
    fn from_str(s: &str) -> Result<Self, CaError> {
        let folded = fold(s);
        if let Some(reason) = RevocationReason::ALL
            .into_iter()
            .find(|r| fold(r.as_str()) == folded)
        {
            return Ok(reason);
        }
        let reason = match folded.as_str() {
            "certificatehold" => "revocation is permanent; certificateHold (suspension) \
                                  is not supported"
                .to_owned(),
            "cacompromise" | "aacompromise" | "removefromcrl" => format!(
                "{} is not applicable to device certificates",
                match folded.as_str() {
                    "cacompromise" => "cACompromise",
                    "aacompromise" => "aACompromise",
                    _ => "removeFromCRL",
                }
            ),
            _ => format!(
                "expected one of {}",
                RevocationReason::ALL
                    .map(RevocationReason::as_str)
                    .join(", ")
            ),
        };
        Err(CaError::InvalidRevocationReason {
            given: s.to_owned(),
            reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_codes_and_round_trips() {
        let expected = [
            ("unspecified", 0),
            ("keyCompromise", 1),
            ("affiliationChanged", 3),
            ("superseded", 4),
            ("cessationOfOperation", 5),
            ("privilegeWithdrawn", 9),
        ];
        for (r, (name, code)) in RevocationReason::ALL.into_iter().zip(expected) {
            assert_eq!(r.as_str(), name);
            assert_eq!(r.to_string(), name);
            assert_eq!(r.code(), code);
            assert_eq!(r.to_rcgen() as u8, code);
            assert_eq!(RevocationReason::from_code(code), Some(r));
            assert_eq!(name.parse::<RevocationReason>().unwrap(), r);
        }
        for code in [2, 6, 7, 8, 10, 255] {
            assert_eq!(RevocationReason::from_code(code), None);
        }
    }

    #[test]
    fn parsing_is_lenient_about_case_and_separators() {
        for s in [
            "keyCompromise",
            "KEYCOMPROMISE",
            "keycompromise",
            "key-compromise",
            "key_compromise",
            "Key-Compromise",
        ] {
            assert_eq!(
                s.parse::<RevocationReason>().unwrap(),
                RevocationReason::KeyCompromise,
                "{s}"
            );
        }
        assert_eq!(
            "cessation-of-operation"
                .parse::<RevocationReason>()
                .unwrap(),
            RevocationReason::CessationOfOperation
        );
        assert_eq!(
            "PRIVILEGE_WITHDRAWN".parse::<RevocationReason>().unwrap(),
            RevocationReason::PrivilegeWithdrawn
        );
    }

    fn refusal(s: &str) -> String {
        match s.parse::<RevocationReason>() {
            Err(e @ CaError::InvalidRevocationReason { .. }) => e.to_string(),
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn refusals_say_why() {
        for s in ["certificateHold", "certificate-hold", "CERTIFICATE_HOLD"] {
            let msg = refusal(s);
            assert!(msg.contains("permanent"), "{msg}");
            assert!(msg.contains("not supported"), "{msg}");
        }
        for (s, name) in [
            ("cACompromise", "cACompromise"),
            ("ca-compromise", "cACompromise"),
            ("aACompromise", "aACompromise"),
            ("removeFromCRL", "removeFromCRL"),
            ("remove_from_crl", "removeFromCRL"),
        ] {
            let msg = refusal(s);
            assert!(
                msg.contains(name) && msg.contains("not applicable to device certificates"),
                "{msg}"
            );
        }
        for s in ["", "compromised", "key compromise", "1"] {
            let msg = refusal(s);
            assert!(
                msg.contains(
                    "expected one of unspecified, keyCompromise, affiliationChanged, \
                     superseded, cessationOfOperation, privilegeWithdrawn"
                ),
                "{msg}"
            );
        }
    }
}
