//! Any bytes given to the RESP request framer, whole and split in two at any point: no panic;
//! every command taken consumes bytes; splitting the input never changes what is read; and
//! every multibulk request taken reads exactly as the `redis-protocol` crate's decoder reads
//! the same bytes (the oracle: same arguments, same length consumed).
#![no_main]

use bytes::{Bytes, BytesMut};
use cachesync::resp::frame::{Limits, ProtocolError, next_command};
use libfuzzer_sys::fuzz_target;
use redis_protocol::resp2::{decode::decode, types::OwnedFrame};

const LIMITS: Limits = Limits {
    max_inline: 64,
    max_bulk: 64,
    max_multibulk: 16,
    max_query: 512,
};

/// Every command (with the bytes it consumed) until the framer wants more or fails.
fn frame_all(chunks: &[&[u8]]) -> (Vec<(Vec<Bytes>, Vec<u8>)>, Option<ProtocolError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.clone();
            match next_command(&mut buf, &LIMITS) {
                Ok(Some(args)) => {
                    let used = before.len() - buf.len();
                    assert!(used > 0, "a command consumes bytes");
                    out.push((args, before[..used].to_vec()));
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, data)) = data.split_first() else { return };
    let at = (cut as usize).min(data.len());
    let whole = frame_all(&[data]);
    let split = frame_all(&[&data[..at], &data[at..]]);
    assert_eq!(whole, split, "splitting the input changed what was read");
    for (args, wire) in &whole.0 {
        if wire.first() != Some(&b'*') || args.is_empty() {
            continue;
        }
        let (frame, used) = decode(wire).expect("the oracle accepts it").expect("and finds it whole");
        assert_eq!(used, wire.len());
        let OwnedFrame::Array(items) = frame else { panic!("not an array: {frame:?}") };
        let theirs: Vec<Vec<u8>> = items
            .into_iter()
            .map(|f| match f {
                OwnedFrame::BulkString(b) => b,
                other => panic!("not a bulk string: {other:?}"),
            })
            .collect();
        let ours: Vec<Vec<u8>> = args.iter().map(|a| a.to_vec()).collect();
        assert_eq!(ours, theirs);
    }
});
