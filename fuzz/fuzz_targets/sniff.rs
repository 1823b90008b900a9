//! Protocol detection on `auto` ports: the outbound listener peeks at the
//! client's first bytes, possibly several times as they arrive. A verdict
//! must be final: more bytes never change an HTTP/opaque answer.
#![no_main]

use bulwark_sidecar::outbound::{SNIFF_BYTES, Sniffed, sniff};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let full = sniff(data);
    if data.len() >= SNIFF_BYTES {
        assert_ne!(full, Sniffed::NeedMore, "{SNIFF_BYTES} bytes always decide");
    }
    // The peeks the listener may have made before this one.
    for k in 1..=data.len().min(SNIFF_BYTES) {
        let early = sniff(&data[..k]);
        if early != Sniffed::NeedMore {
            assert_eq!(early, full, "verdict on {k} bytes changed with more");
        }
    }
});
