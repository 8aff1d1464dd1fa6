//! Any bytes given to the record decoder: no panic, and a decoded frame re-encodes to the same
//! bytes.
#![no_main]

use cachesync::commitlog::record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = record::decode(data) {
        let mut again = Vec::new();
        record::encode(frame.offset, frame.timestamp_ms, frame.payload, &mut again);
        assert_eq!(&again[..], &data[..frame.len()]);
    }
});
