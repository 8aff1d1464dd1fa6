//! Record framing: how one record sits in a segment file.
//!
//! ```text
//! 0   1  magic      0xCA = record format 1
//! 1   4  length     payload bytes, u32 LE
//! 5   4  crc32c     over bytes 9.. (offset, timestamp, payload), u32 LE
//! 9   8  offset     the record's absolute offset, u64 LE
//! 17  8  timestamp  append time, ms since the Unix epoch, u64 LE
//! 25  …  payload    an encoded `ChangeEvent`
//! ```
//!
//! The offset is inside the CRC so a record copied to the wrong place, or a stale tail from an
//! earlier write, can never pass as the record expected at a position. Decoding never panics.

use super::Offset;

/// Record format 1.
pub const MAGIC: u8 = 0xCA;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 25;
/// Largest payload accepted; a larger length field is treated as corruption.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// A decoded record borrowing its payload from the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub offset: Offset,
    pub timestamp_ms: u64,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes the frame occupies on disk.
    pub fn len(&self) -> usize {
        HEADER_LEN + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// Why bytes at a position are not a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The buffer ends inside the frame; `needed` bytes in all would complete it.
    Incomplete {
        needed: usize,
    },
    BadMagic(u8),
    TooLarge(usize),
    BadCrc,
}

/// Appends one framed record to `out`.
pub fn encode(offset: Offset, timestamp_ms: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.push(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc_at = out.len();
    out.extend_from_slice(&[0; 4]);
    let body_at = out.len();
    out.extend_from_slice(&offset.0.to_le_bytes());
    out.extend_from_slice(&timestamp_ms.to_le_bytes());
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[body_at..]);
    out[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Decodes the record at the start of `buf`.
pub fn decode(buf: &[u8]) -> Result<Frame<'_>, FrameError> {
    if buf.is_empty() {
        return Err(FrameError::Incomplete { needed: HEADER_LEN });
    }
    if buf[0] != MAGIC {
        return Err(FrameError::BadMagic(buf[0]));
    }
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Incomplete { needed: HEADER_LEN });
    }
    let len = u32_at(buf, 1) as usize;
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    let total = HEADER_LEN + len;
    if buf.len() < total {
        return Err(FrameError::Incomplete { needed: total });
    }
    if crc32c::crc32c(&buf[9..total]) != u32_at(buf, 5) {
        return Err(FrameError::BadCrc);
    }
    Ok(Frame {
        offset: Offset(u64_at(buf, 9)),
        timestamp_ms: u64_at(buf, 17),
        payload: &buf[HEADER_LEN..total],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(offset in any::<u64>(), ts in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut buf = Vec::new();
            encode(Offset(offset), ts, &payload, &mut buf);
            let f = decode(&buf).unwrap();
            prop_assert_eq!(f.offset, Offset(offset));
            prop_assert_eq!(f.timestamp_ms, ts);
            prop_assert_eq!(f.payload, &payload[..]);
            prop_assert_eq!(f.len(), buf.len());
        }

        #[test]
        fn every_prefix_is_incomplete_and_every_flip_is_caught(payload in proptest::collection::vec(any::<u8>(), 0..300), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut buf = Vec::new();
            encode(Offset(5), 9, &payload, &mut buf);
            let cut = at.index(buf.len());
            let prefix = decode(&buf[..cut]);
            prop_assert!(matches!(prefix, Err(FrameError::Incomplete { .. }) | Err(FrameError::BadMagic(_))), "prefix of {} bytes decoded as {:?}", cut, prefix);
            buf[cut] ^= 1 << bit;
            prop_assert!(decode(&buf).is_err(), "a flipped bit at {} went unnoticed", cut);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&bytes);
        }
    }
}
