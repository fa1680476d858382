//! Any bytes as a response, to GET or HEAD, for an HTTP/1.1 or HTTP/1.0 client (the first byte
//! chooses): refused, incomplete, or one canonical message with the same meaning
//! (`switchyard::http1::verify::response_invariant`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&how, bytes)) = data.split_first() else {
        return;
    };
    let (head_request, http10) = (how & 1 == 1, how & 2 == 2);
    if let Err(e) = switchyard::http1::verify::response_invariant(bytes, head_request, http10) {
        panic!("{e}\ninput: {:?}", String::from_utf8_lossy(bytes));
    }
});
