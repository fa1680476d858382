//! Any bytes as a request: refused, incomplete, or exactly one canonical message with the same
//! meaning whatever the split (`switchyard::http1::verify::request_invariant`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = switchyard::http1::verify::request_invariant(data) {
        panic!("{e}\ninput: {:?}", String::from_utf8_lossy(data));
    }
});
