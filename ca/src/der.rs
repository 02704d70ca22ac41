//! The few lines of DER this crate writes and walks by hand: tag-length-value headers
//! with definite lengths.

/// Appends a TLV header: a one-octet tag and the DER (minimal) length.
pub(crate) fn push_header(out: &mut Vec<u8>, tag: u8, len: usize) {
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let octets = len.to_be_bytes();
        let skip = octets.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (octets.len() - skip) as u8);
        out.extend_from_slice(&octets[skip..]);
    }
}

/// The length of a TLV header for `len` content octets.
pub(crate) fn header_len(len: usize) -> usize {
    if len < 0x80 {
        2
    } else {
        2 + (usize::BITS - len.leading_zeros()).div_ceil(8) as usize
    }
}

/// Reads one TLV header with a one-octet tag and a definite length, returning
/// `(tag, header length, content length)`; `None` if it is malformed or the content
/// runs past the input.
pub(crate) fn read_header(input: &[u8]) -> Option<(u8, usize, usize)> {
    let (tag, header, len) = read_header_unchecked(input)?;
    (input.len() - header >= len).then_some((tag, header, len))
}

/// Whether `input` starts with a well-formed header whose content runs past the end:
/// the data was cut short.
pub(crate) fn is_truncated(input: &[u8]) -> bool {
    read_header_unchecked(input).is_some_and(|(_, header, len)| input.len() - header < len)
}

/// [`read_header`] without the check that the content fits in `input`.
fn read_header_unchecked(input: &[u8]) -> Option<(u8, usize, usize)> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None; // multi-octet tags are never needed here
    }
    let (&first, rest) = rest.split_first()?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > std::mem::size_of::<usize>() || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (2 + n, len)
    };
    Some((tag, header, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for len in [
            0usize, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x10000, 0x123456,
        ] {
            let mut out = Vec::new();
            push_header(&mut out, 0x30, len);
            assert_eq!(out.len(), header_len(len), "{len}");
            let header = out.len();
            out.resize(header + len, 0);
            assert_eq!(read_header(&out), Some((0x30, header, len)), "{len}");
            assert_eq!(read_header(&out[..out.len() - 1]), None, "{len}");
            assert!(!is_truncated(&out), "{len}");
            assert_eq!(is_truncated(&out[..out.len() - 1]), len > 0, "{len}");
        }
        let mut out = Vec::new();
        push_header(&mut out, 0x04, 0x1234);
        assert_eq!(out, [0x04, 0x82, 0x12, 0x34]);
        assert_eq!(read_header(&[0x30, 0x80]), None, "indefinite length");
        assert_eq!(read_header(&[0x1f, 0x01, 0x00]), None, "multi-octet tag");
        assert_eq!(read_header(&[]), None);
    }
}
