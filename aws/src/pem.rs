//! Certificate ids as AWS IoT computes them.

use base64::Engine as _;

/// The DER of the first `CERTIFICATE` block in `pem`, or `None` if there is none or its base64
/// is broken.
pub(crate) fn first_certificate_der(pem: &str) -> Option<Vec<u8>> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    const END: &str = "-----END CERTIFICATE-----";
    let start = pem.find(BEGIN)? + BEGIN.len();
    let len = pem[start..].find(END)?;
    let body: String = pem[start..start + len]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .ok()?;
    (!der.is_empty()).then_some(der)
}

/// Lowercase hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest
        .as_ref()
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// The id AWS IoT gives a certificate (device or CA): the lowercase hex SHA-256 of its DER.
/// Reads the first `CERTIFICATE` block of `pem`; `None` if there is none.
pub fn certificate_id(pem: &str) -> Option<String> {
    first_certificate_der(pem).map(|der| sha256_hex(&der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_empty_input() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn reads_first_block_ignoring_line_breaks() {
        // base64 of "hello world!" split over lines, then a second block that must be ignored.
        let pem = concat!(
            "junk\n-----BEGIN CERTIFICATE-----\naGVsbG8g\r\nd29ybGQh\n",
            "-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        assert_eq!(
            first_certificate_der(pem).as_deref(),
            Some(&b"hello world!"[..])
        );
        assert_eq!(certificate_id(pem), Some(sha256_hex(b"hello world!")));
    }

    #[test]
    fn rejects_non_certificates() {
        assert_eq!(certificate_id(""), None);
        assert_eq!(
            certificate_id("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            None
        );
        assert_eq!(
            certificate_id("-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n"),
            None
        );
        assert_eq!(
            certificate_id("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"),
            None
        );
    }
}
