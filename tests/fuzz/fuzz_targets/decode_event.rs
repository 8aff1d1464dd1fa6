//! Any bytes given to the change-event decoder: no panic, and a decoded event survives an
//! encode/decode round trip unchanged.
#![no_main]

use cachesync::event::ChangeEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = ChangeEvent::decode(data) {
        let again = ChangeEvent::decode(&event.encode()).expect("an encoded event decodes");
        assert_eq!(again, event);
    }
});
