//! The degenerate ("certs-only") CMS SignedData that EST (RFC 7030) answers with.

use crate::der::{header_len, push_header};

/// id-signedData, 1.2.840.113549.1.7.2, as a complete OBJECT IDENTIFIER TLV.
const OID_SIGNED_DATA: [u8; 11] = [
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02,
];
/// id-data, 1.2.840.113549.1.7.1.
const OID_DATA: [u8; 11] = [
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01,
];
/// version CMSVersion (1).
const VERSION_1: [u8; 3] = [0x02, 0x01, 0x01];
/// An empty SET (digestAlgorithms, signerInfos).
const EMPTY_SET: [u8; 2] = [0x31, 0x00];

/// ContentInfo { id-signedData, [0] EXPLICIT SignedData { 1, {}, { id-data },
/// [0] IMPLICIT certificates, {} } }.
pub(crate) fn certs_only(certs: &[&[u8]]) -> Vec<u8> {
    let certs_len: usize = certs.iter().map(|c| c.len()).sum();
    // certificates [0] IMPLICIT CertificateSet OPTIONAL: left out when empty.
    let certs_field = if certs.is_empty() {
        0
    } else {
        header_len(certs_len) + certs_len
    };
    let encap_len = OID_DATA.len();
    let signed_len = VERSION_1.len()
        + EMPTY_SET.len()
        + header_len(encap_len)
        + encap_len
        + certs_field
        + EMPTY_SET.len();
    let explicit_len = header_len(signed_len) + signed_len;
    let info_len = OID_SIGNED_DATA.len() + header_len(explicit_len) + explicit_len;

    let mut out = Vec::with_capacity(header_len(info_len) + info_len);
    push_header(&mut out, 0x30, info_len); // ContentInfo
    out.extend_from_slice(&OID_SIGNED_DATA); // contentType
    push_header(&mut out, 0xa0, explicit_len); // content [0] EXPLICIT
    push_header(&mut out, 0x30, signed_len); // SignedData
    out.extend_from_slice(&VERSION_1);
    out.extend_from_slice(&EMPTY_SET); // digestAlgorithms
    push_header(&mut out, 0x30, encap_len); // encapContentInfo, no eContent
    out.extend_from_slice(&OID_DATA);
    if !certs.is_empty() {
        push_header(&mut out, 0xa0, certs_len); // certificates [0] IMPLICIT SET OF
        for cert in certs {
            out.extend_from_slice(cert);
        }
    }
    out.extend_from_slice(&EMPTY_SET); // signerInfos
    debug_assert_eq!(out.len(), out.capacity());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_bundle_has_the_fixed_shape() {
        assert_eq!(
            hex::encode(certs_only(&[])),
            "3023\
             06092a864886f70d010702\
             a016\
             3014\
             020101\
             3100\
             300b06092a864886f70d010701\
             3100"
        );
    }

    #[test]
    fn certificates_are_embedded_in_order() {
        let a = [0x30, 0x01, 0xaa];
        let b = vec![0x30; 300];
        let out = certs_only(&[&a, &b]);
        let set = &out[..];
        let at = set
            .windows(4)
            .position(|w| w == [0xa0, 0x82, 0x01, 0x2f])
            .expect("certificates [0] with a two-octet length");
        assert_eq!(&out[at + 4..at + 7], &a);
        assert_eq!(&out[at + 7..at + 307], &b[..]);
        assert_eq!(&out[at + 307..], &EMPTY_SET);
        assert_eq!(
            crate::der::read_header(&out),
            Some((0x30, 4, out.len() - 4))
        );
    }
}
