//! The few MQTT 3.1.1 packets a device (and a load generator) needs, encoded and decoded
//! by hand (OASIS MQTT 3.1.1, section 2 for the fixed header and remaining length,
//! section 3 for each packet): CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK,
//! PINGREQ, PINGRESP and DISCONNECT. Anything else the broker sends is returned as
//! [`Packet::Other`] and skipped.

/// Control packet types (the high nibble of the first byte).
pub mod kind {
    /// Client → server: the session request.
    pub const CONNECT: u8 = 1;
    /// Server → client: the answer to CONNECT.
    pub const CONNACK: u8 = 2;
    /// Either way: an application message.
    pub const PUBLISH: u8 = 3;
    /// Either way: acknowledgement of a QoS 1 PUBLISH.
    pub const PUBACK: u8 = 4;
    /// Client → server: subscription request.
    pub const SUBSCRIBE: u8 = 8;
    /// Server → client: the answer to SUBSCRIBE.
    pub const SUBACK: u8 = 9;
    /// Client → server: keep-alive.
    pub const PINGREQ: u8 = 12;
    /// Server → client: the answer to PINGREQ.
    pub const PINGRESP: u8 = 13;
    /// Client → server: clean end of the session.
    pub const DISCONNECT: u8 = 14;
}

/// The largest remaining length MQTT can express (four length bytes).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;

/// A packet from the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// CONNACK: `code` 0 is accepted; 1–5 are the 3.1.1 refusals (5: not authorized).
    ConnAck {
        /// The broker kept a session from before.
        session_present: bool,
        /// The return code.
        code: u8,
    },
    /// PUBACK for the client's QoS 1 PUBLISH `packet_id`.
    PubAck {
        /// The packet identifier acknowledged.
        packet_id: u16,
    },
    /// SUBACK: one return code per filter (0–2 granted QoS, 0x80 failure).
    SubAck {
        /// The SUBSCRIBE's packet identifier.
        packet_id: u16,
        /// Return codes, in the order of the filters.
        codes: Vec<u8>,
    },
    /// A message delivered to the client.
    Publish {
        /// Its QoS (0, 1 or 2).
        qos: u8,
        /// Its packet identifier (QoS 1 and 2 only).
        packet_id: Option<u16>,
        /// The topic name.
        topic: String,
        /// The payload.
        payload: Vec<u8>,
    },
    /// PINGRESP.
    PingResp,
    /// Any other packet type (the high nibble of its first byte), skipped.
    Other {
        /// The packet type.
        kind: u8,
    },
}

/// Why bytes from the broker are not MQTT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The remaining length runs over four bytes.
    RemainingLengthTooLong,
    /// A packet is shorter than its type requires, or its fields run past its end.
    Truncated(u8),
    /// A PUBLISH topic is not UTF-8.
    BadTopic,
    /// Reserved flag bits or a QoS of 3.
    BadFlags(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::RemainingLengthTooLong => write!(f, "remaining length over 4 bytes"),
            DecodeError::Truncated(k) => write!(f, "packet type {k} is too short"),
            DecodeError::BadTopic => write!(f, "PUBLISH topic is not UTF-8"),
            DecodeError::BadFlags(b) => write!(f, "bad fixed-header flags {b:#04x}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Appends the variable-length "remaining length" (1–4 bytes, 7 bits each, low first).
///
/// # Panics
/// If `len` exceeds [`MAX_REMAINING_LENGTH`] (the encoders here never build such packets).
pub fn put_remaining_length(out: &mut Vec<u8>, mut len: usize) {
    assert!(len <= MAX_REMAINING_LENGTH, "MQTT packet too large: {len}");
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

/// Reads a remaining length at the start of `buf`: `Ok(None)` if more bytes are needed,
/// else the length and how many bytes encoded it.
pub fn read_remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut value = 0usize;
    for (i, byte) in buf.iter().enumerate() {
        if i == 4 {
            return Err(DecodeError::RemainingLengthTooLong);
        }
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    if buf.len() >= 4 {
        return Err(DecodeError::RemainingLengthTooLong);
    }
    Ok(None)
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).expect("MQTT strings are at most 65,535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    put_remaining_length(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT (protocol level 4, MQTT 3.1.1) with no username, password or will: the
/// identity is the TLS client certificate.
pub fn connect(client_id: &str, keep_alive_seconds: u16, clean_session: bool) -> Vec<u8> {
    let mut body = Vec::with_capacity(12 + client_id.len());
    put_str(&mut body, "MQTT");
    body.push(4);
    body.push(if clean_session { 0x02 } else { 0x00 });
    body.extend_from_slice(&keep_alive_seconds.to_be_bytes());
    put_str(&mut body, client_id);
    packet(kind::CONNECT << 4, &body)
}

/// PUBLISH at QoS 1 with `packet_id`, or at QoS 0 when `packet_id` is `None`.
///
/// # Panics
/// If `packet_id` is `Some(0)` (MQTT packet identifiers are non-zero).
pub fn publish(topic: &str, packet_id: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(4 + topic.len() + payload.len());
    put_str(&mut body, topic);
    let mut first = kind::PUBLISH << 4;
    if let Some(id) = packet_id {
        assert_ne!(id, 0, "packet identifier 0 is reserved");
        first |= 1 << 1;
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    packet(first, &body)
}

/// PUBACK for a QoS 1 message the broker delivered.
pub fn puback(packet_id: u16) -> Vec<u8> {
    packet(kind::PUBACK << 4, &packet_id.to_be_bytes())
}

/// SUBSCRIBE to one filter at `qos` (the fixed header's flags are 0b0010, as required).
pub fn subscribe(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = Vec::with_capacity(5 + filter.len());
    body.extend_from_slice(&packet_id.to_be_bytes());
    put_str(&mut body, filter);
    body.push(qos);
    packet((kind::SUBSCRIBE << 4) | 0x02, &body)
}

/// SUBSCRIBE to several filters, each at its QoS, in one packet.
pub fn subscribe_many(packet_id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(2 + filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>());
    body.extend_from_slice(&packet_id.to_be_bytes());
    for (filter, qos) in filters {
        put_str(&mut body, filter);
        body.push(*qos);
    }
    packet((kind::SUBSCRIBE << 4) | 0x02, &body)
}

/// PINGREQ.
pub fn pingreq() -> Vec<u8> {
    vec![kind::PINGREQ << 4, 0]
}

/// DISCONNECT.
pub fn disconnect() -> Vec<u8> {
    vec![kind::DISCONNECT << 4, 0]
}

fn u16_at(body: &[u8], at: usize, kind: u8) -> Result<u16, DecodeError> {
    body.get(at..at + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(DecodeError::Truncated(kind))
}

/// Decodes the first packet in `buf`: `Ok(None)` if it is not complete yet, else the
/// packet and the number of bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Packet, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((len, len_bytes)) = read_remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    let start = 1 + len_bytes;
    let Some(body) = buf.get(start..start + len) else {
        return Ok(None);
    };
    let kind = first >> 4;
    let flags = first & 0x0f;
    let packet = match kind {
        kind::CONNACK => {
            if body.len() != 2 {
                return Err(DecodeError::Truncated(kind));
            }
            Packet::ConnAck {
                session_present: body[0] & 0x01 != 0,
                code: body[1],
            }
        }
        kind::PUBACK => Packet::PubAck {
            packet_id: u16_at(body, 0, kind)?,
        },
        kind::SUBACK => {
            let packet_id = u16_at(body, 0, kind)?;
            if body.len() < 3 {
                return Err(DecodeError::Truncated(kind));
            }
            Packet::SubAck {
                packet_id,
                codes: body[2..].to_vec(),
            }
        }
        kind::PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(DecodeError::BadFlags(first));
            }
            let topic_len = usize::from(u16_at(body, 0, kind)?);
            let topic = body
                .get(2..2 + topic_len)
                .ok_or(DecodeError::Truncated(kind))?;
            let topic = std::str::from_utf8(topic)
                .map_err(|_| DecodeError::BadTopic)?
                .to_owned();
            let mut at = 2 + topic_len;
            let packet_id = if qos > 0 {
                let id = u16_at(body, at, kind)?;
                at += 2;
                Some(id)
            } else {
                None
            };
            Packet::Publish {
                qos,
                packet_id,
                topic,
                payload: body[at..].to_vec(),
            }
        }
        kind::PINGRESP => Packet::PingResp,
        other => Packet::Other { kind: other },
    };
    Ok(Some((packet, start + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded_length(len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        put_remaining_length(&mut out, len);
        out
    }

    #[test]
    fn remaining_length_boundaries() {
        // The examples of MQTT 3.1.1 table 2.4.
        assert_eq!(encoded_length(0), [0x00]);
        assert_eq!(encoded_length(127), [0x7f]);
        assert_eq!(encoded_length(128), [0x80, 0x01]);
        assert_eq!(encoded_length(16_383), [0xff, 0x7f]);
        assert_eq!(encoded_length(16_384), [0x80, 0x80, 0x01]);
        assert_eq!(encoded_length(2_097_151), [0xff, 0xff, 0x7f]);
        assert_eq!(encoded_length(2_097_152), [0x80, 0x80, 0x80, 0x01]);
        assert_eq!(
            encoded_length(MAX_REMAINING_LENGTH),
            [0xff, 0xff, 0xff, 0x7f]
        );
        for len in [
            0,
            1,
            127,
            128,
            300,
            16_383,
            16_384,
            2_097_152,
            MAX_REMAINING_LENGTH,
        ] {
            let bytes = encoded_length(len);
            assert_eq!(
                read_remaining_length(&bytes),
                Ok(Some((len, bytes.len()))),
                "{len}"
            );
        }
    }

    #[test]
    fn remaining_length_incomplete_and_overlong() {
        assert_eq!(read_remaining_length(&[]), Ok(None));
        assert_eq!(read_remaining_length(&[0x80, 0x80]), Ok(None));
        assert_eq!(
            read_remaining_length(&[0x80, 0x80, 0x80, 0x80, 0x01]),
            Err(DecodeError::RemainingLengthTooLong)
        );
        assert_eq!(
            read_remaining_length(&[0x80, 0x80, 0x80, 0x80]),
            Err(DecodeError::RemainingLengthTooLong)
        );
    }

    #[test]
    fn connect_is_byte_exact() {
        let got = connect("dev-1", 60, true);
        let want = [
            0x10, 17, // CONNECT, remaining length
            0, 4, b'M', b'Q', b'T', b'T', // protocol name
            4,    // level: 3.1.1
            0x02, // clean session, no username/password/will
            0, 60, // keep alive
            0, 5, b'd', b'e', b'v', b'-', b'1',
        ];
        assert_eq!(got, want);
        assert_eq!(connect("x", 0, false)[9], 0x00);
    }

    #[test]
    fn publish_qos1_and_qos0() {
        let got = publish("a/b", Some(0x1234), b"hi");
        assert_eq!(
            got,
            [0x32, 9, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'h', b'i']
        );
        let got = publish("a/b", None, b"hi");
        assert_eq!(got, [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']);
        // A payload that needs a two-byte remaining length.
        let big = publish("t", Some(1), &[7u8; 200]);
        // 2 + 2 + 1 + 200 = 205 = 77 + 1 * 128: 0x80 | 77, then 1.
        assert_eq!(&big[..3], [0x32, 0xcd, 0x01]);
        assert_eq!(big.len(), 3 + 205);
    }

    #[test]
    fn subscribe_ping_disconnect_puback() {
        assert_eq!(
            subscribe(7, "d/#", 1),
            [0x82, 8, 0, 7, 0, 3, b'd', b'/', b'#', 1]
        );
        assert_eq!(
            subscribe_many(7, &[("a", 1), ("b/+", 0)]),
            [0x82, 12, 0, 7, 0, 1, b'a', 1, 0, 3, b'b', b'/', b'+', 0]
        );
        assert_eq!(subscribe_many(7, &[("d/#", 1)]), subscribe(7, "d/#", 1));
        assert_eq!(pingreq(), [0xc0, 0]);
        assert_eq!(disconnect(), [0xe0, 0]);
        assert_eq!(puback(0x0102), [0x40, 2, 1, 2]);
    }

    #[test]
    fn decodes_broker_packets() {
        assert_eq!(
            decode(&[0x20, 2, 0, 0]),
            Ok(Some((
                Packet::ConnAck {
                    session_present: false,
                    code: 0
                },
                4
            )))
        );
        assert_eq!(
            decode(&[0x20, 2, 1, 5]),
            Ok(Some((
                Packet::ConnAck {
                    session_present: true,
                    code: 5
                },
                4
            )))
        );
        assert_eq!(
            decode(&[0x40, 2, 0xab, 0xcd, 0xff]),
            Ok(Some((Packet::PubAck { packet_id: 0xabcd }, 4)))
        );
        assert_eq!(
            decode(&[0x90, 4, 0, 7, 1, 0x80]),
            Ok(Some((
                Packet::SubAck {
                    packet_id: 7,
                    codes: vec![1, 0x80]
                },
                6
            )))
        );
        assert_eq!(decode(&[0xd0, 0]), Ok(Some((Packet::PingResp, 2))));
        assert_eq!(
            decode(&[0xb0, 2, 0, 1]),
            Ok(Some((Packet::Other { kind: 11 }, 4)))
        );
    }

    #[test]
    fn decodes_what_it_encodes() {
        for (id, qos) in [(Some(42), 1), (None, 0)] {
            let bytes = publish("devices/d-1/telemetry", id, &[1, 2, 3, 4, 5]);
            let (packet, used) = decode(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(
                packet,
                Packet::Publish {
                    qos,
                    packet_id: id,
                    topic: "devices/d-1/telemetry".into(),
                    payload: vec![1, 2, 3, 4, 5]
                }
            );
        }
    }

    #[test]
    fn waits_for_whole_packets_and_leaves_the_next_one() {
        let mut stream = publish("t/1", Some(1), &[0u8; 300]);
        stream.extend_from_slice(&[0x40, 2, 0, 9]);
        for cut in 0..stream.len() - 4 {
            if cut < 308 {
                assert_eq!(decode(&stream[..cut]), Ok(None), "cut at {cut}");
            }
        }
        let (_, used) = decode(&stream).unwrap().unwrap();
        assert_eq!(
            decode(&stream[used..]),
            Ok(Some((Packet::PubAck { packet_id: 9 }, 4)))
        );
    }

    #[test]
    fn refuses_malformed_packets() {
        assert_eq!(
            decode(&[0x20, 1, 0]),
            Err(DecodeError::Truncated(kind::CONNACK))
        );
        assert_eq!(
            decode(&[0x40, 1, 0]),
            Err(DecodeError::Truncated(kind::PUBACK))
        );
        assert_eq!(
            decode(&[0x90, 2, 0, 1]),
            Err(DecodeError::Truncated(kind::SUBACK))
        );
        // QoS 3.
        assert_eq!(
            decode(&[0x36, 5, 0, 1, b't', 0, 1]),
            Err(DecodeError::BadFlags(0x36))
        );
        // The topic length runs past the packet.
        assert_eq!(
            decode(&[0x30, 3, 0, 9, b't']),
            Err(DecodeError::Truncated(kind::PUBLISH))
        );
        assert_eq!(
            decode(&[0x30, 4, 0, 2, 0xff, 0xfe]),
            Err(DecodeError::BadTopic)
        );
    }
}
