//! The Confluent wire format of a record framed for a schema registry:
//! a magic byte 0, the schema id (4 bytes, big-endian), for Protobuf the
//! indexes of the message type in its file, then the encoded body.
//!
//! A plain JSON record starts with `{` or white space, never with a 0
//! byte, so one topic can hold both: a record is framed exactly when its
//! first byte is 0.

use std::fmt;

/// The first byte of a framed record.
pub const MAGIC_BYTE: u8 = 0;

/// The magic byte and the schema id.
pub const HEADER_BYTES: usize = 5;

/// Message indexes read at most: a nesting depth no real schema reaches,
/// so a corrupt count cannot make the reader allocate without end.
pub const MAX_MESSAGE_INDEXES: usize = 32;

/// A record's bytes, framed or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing<'a> {
    /// No framing: plain JSON, or bytes that are not an event at all.
    Unframed(&'a [u8]),
    /// Framed for `schema_id`; `body` follows the header (for Protobuf it
    /// still starts with the message indexes: [`message_indexes`]).
    Framed { schema_id: u32, body: &'a [u8] },
}

/// Why framed bytes cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// A 0 first byte, but fewer than [`HEADER_BYTES`] bytes.
    TooShort(usize),
    /// The Protobuf message indexes are cut short or out of bounds.
    MessageIndexes(String),
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::TooShort(bytes) => {
                write!(f, "a framed record of {bytes} bytes, shorter than its {HEADER_BYTES}-byte header")
            }
            FramingError::MessageIndexes(why) => write!(f, "protobuf message indexes: {why}"),
        }
    }
}

/// Reads the framing of `bytes`.
pub fn framing(bytes: &[u8]) -> Result<Framing<'_>, FramingError> {
    match bytes.first() {
        Some(&MAGIC_BYTE) => {
            let Some((header, body)) = bytes.split_at_checked(HEADER_BYTES) else {
                return Err(FramingError::TooShort(bytes.len()));
            };
            let schema_id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
            Ok(Framing::Framed { schema_id, body })
        }
        _ => Ok(Framing::Unframed(bytes)),
    }
}

/// Splits a Protobuf body into the indexes of its message type (the first
/// message of the file is `[0]`, written as one 0 byte) and the message.
pub fn message_indexes(body: &[u8]) -> Result<(Vec<i32>, &[u8]), FramingError> {
    let (count, mut rest) = read_varint(body)?;
    if count == 0 {
        return Ok((vec![0], rest));
    }
    let count = usize::try_from(count)
        .ok()
        .filter(|count| *count <= MAX_MESSAGE_INDEXES)
        .ok_or_else(|| FramingError::MessageIndexes(format!("{count} indexes, more than {MAX_MESSAGE_INDEXES}")))?;
    let mut indexes = Vec::with_capacity(count);
    for _ in 0..count {
        let (index, after) = read_varint(rest)?;
        if index < 0 {
            return Err(FramingError::MessageIndexes(format!("a negative index ({index})")));
        }
        indexes.push(index);
        rest = after;
    }
    Ok((indexes, rest))
}

/// `body` framed for `schema_id` (Avro and JSON Schema).
pub fn frame(schema_id: u32, body: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(HEADER_BYTES + body.len());
    framed.push(MAGIC_BYTE);
    framed.extend_from_slice(&schema_id.to_be_bytes());
    framed.extend_from_slice(body);
    framed
}

/// A Protobuf message framed for `schema_id`, as the message at `indexes`.
pub fn frame_protobuf(schema_id: u32, indexes: &[i32], message: &[u8]) -> Vec<u8> {
    let mut framed = frame(schema_id, &[]);
    if indexes == [0] {
        framed.push(0);
    } else {
        write_varint(&mut framed, indexes.len() as i32);
        for index in indexes {
            write_varint(&mut framed, *index);
        }
    }
    framed.extend_from_slice(message);
    framed
}

/// A zig-zag varint of at most 5 bytes, as Confluent's serializers write
/// the message indexes.
fn read_varint(bytes: &[u8]) -> Result<(i32, &[u8]), FramingError> {
    let mut value: u32 = 0;
    for (at, byte) in bytes.iter().take(5).enumerate() {
        value |= u32::from(byte & 0x7f) << (7 * at);
        if byte & 0x80 == 0 {
            let decoded = ((value >> 1) as i32) ^ -((value & 1) as i32);
            return Ok((decoded, &bytes[at + 1..]));
        }
    }
    Err(FramingError::MessageIndexes(if bytes.len() < 5 {
        "cut short".to_string()
    } else {
        "a varint longer than 5 bytes".to_string()
    }))
}

fn write_varint(out: &mut Vec<u8>, value: i32) {
    let mut zigzag = ((value << 1) ^ (value >> 31)) as u32;
    loop {
        let byte = (zigzag & 0x7f) as u8;
        zigzag >>= 7;
        if zigzag == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_is_unframed_and_a_zero_byte_frames() {
        assert_eq!(framing(b"{\"id\":1}"), Ok(Framing::Unframed(b"{\"id\":1}")));
        assert_eq!(framing(b""), Ok(Framing::Unframed(b"")));
        assert_eq!(framing(&[0, 0, 0, 1, 2, 9, 9]), Ok(Framing::Framed { schema_id: 258, body: &[9, 9] }));
        assert_eq!(framing(&[0, 0, 0]), Err(FramingError::TooShort(3)));
        assert_eq!(FramingError::TooShort(3).to_string(), "a framed record of 3 bytes, shorter than its 5-byte header");
    }

    #[test]
    fn the_first_message_is_one_zero_byte() {
        assert_eq!(message_indexes(&[0, 8, 1]), Ok((vec![0], &[8u8, 1][..])));
        assert_eq!(frame_protobuf(7, &[0], &[8, 1]), [0, 0, 0, 0, 7, 0, 8, 1]);
    }

    #[test]
    fn nested_messages_read_as_confluent_writes_them() {
        // Two indexes [1, 0]: count 2 and index 1 zig-zag to 4 and 2.
        assert_eq!(message_indexes(&[4, 2, 0, 8]), Ok((vec![1, 0], &[8u8][..])));
        assert_eq!(frame_protobuf(1, &[1, 0], &[8]), [0, 0, 0, 0, 1, 4, 2, 0, 8]);
    }

    #[test]
    fn corrupt_indexes_are_refused() {
        assert!(matches!(message_indexes(&[]), Err(FramingError::MessageIndexes(_))));
        assert!(matches!(message_indexes(&[0x80, 0x80]), Err(FramingError::MessageIndexes(_))));
        assert!(matches!(message_indexes(&[0xff; 9]), Err(FramingError::MessageIndexes(_))));
        // 1,000 indexes announced: refused before any allocation.
        let mut huge = Vec::new();
        write_varint(&mut huge, 1_000);
        assert!(matches!(message_indexes(&huge), Err(FramingError::MessageIndexes(_))));
        assert!(matches!(message_indexes(&[2, 1]), Err(FramingError::MessageIndexes(_))), "a negative index");
    }

    proptest! {
        #[test]
        fn any_bytes_read_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Framing::Framed { body, .. }) = framing(&bytes) {
                let _ = message_indexes(body);
            }
        }

        #[test]
        fn framed_protobuf_reads_back(
            id in any::<u32>(),
            indexes in prop::collection::vec(0..10_000i32, 1..MAX_MESSAGE_INDEXES),
            message in prop::collection::vec(any::<u8>(), 0..32),
        ) {
            let framed = frame_protobuf(id, &indexes, &message);
            let Ok(Framing::Framed { schema_id, body }) = framing(&framed) else { panic!("framed") };
            prop_assert_eq!(schema_id, id);
            prop_assert_eq!(message_indexes(body), Ok((indexes, &message[..])));
        }
    }
}
