//! The degenerate ("certs-only") CMS SignedData that EST (RFC 7030) answers with.

use der::asn1::ObjectIdentifier;
use der::{Encode, Header, Length, Tag, TagNumber};

/// id-signedData.
const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
/// id-data.
const ID_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
/// An empty SET (digestAlgorithms, signerInfos).
#[cfg(test)]
const EMPTY_SET: [u8; 2] = [0x31, 0x00];

/// `[0]`, constructed: the EXPLICIT content of ContentInfo and the IMPLICIT
/// certificates SET OF of SignedData.
const CONTEXT_0: Tag = Tag::ContextSpecific {
    constructed: true,
    number: TagNumber(0),
};

/// A TLV: `tag`, the DER length, then the content parts in order.
fn tlv(tag: Tag, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let length = Length::try_from(len).expect("a certs-only bundle under 256 MiB");
    let mut out = Header::new(tag, length)
        .to_der()
        .expect("a header of a valid length encodes");
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// ContentInfo { id-signedData, [0] EXPLICIT SignedData { 1, {}, { id-data },
/// [0] IMPLICIT certificates, {} } }.
///
/// The certificates SET OF keeps the caller's order (EST clients and the tests read
/// the issuing CA first), so it is written here rather than through `der`'s
/// `SetOfVec`, which sorts its elements.
pub(crate) fn certs_only(certs: &[&[u8]]) -> Vec<u8> {
    let oid = |oid: ObjectIdentifier| oid.to_der().expect("a constant OID encodes");
    let version = 1u8.to_der().expect("INTEGER 1 encodes");
    let empty_set = tlv(Tag::Set, &[]);
    let encap = tlv(Tag::Sequence, &[&oid(ID_DATA)]);
    // certificates [0] IMPLICIT CertificateSet OPTIONAL: left out when empty.
    let certificates = if certs.is_empty() {
        Vec::new()
    } else {
        tlv(CONTEXT_0, certs)
    };
    let signed_data = tlv(
        Tag::Sequence,
        &[&version, &empty_set, &encap, &certificates, &empty_set],
    );
    tlv(
        Tag::Sequence,
        &[&oid(ID_SIGNED_DATA), &tlv(CONTEXT_0, &[&signed_data])],
    )
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
        // One SEQUENCE with a two-octet length spanning the rest.
        assert_eq!(&out[..2], [0x30, 0x82]);
        assert_eq!(
            usize::from(u16::from_be_bytes([out[2], out[3]])),
            out.len() - 4
        );
    }
}
