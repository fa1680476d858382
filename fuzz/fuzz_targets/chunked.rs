//! Any bytes as a chunked body, of a request and of a response (to an HTTP/1.1 and an HTTP/1.0
//! client): the strict decoder refuses them, waits for more, or what is sent on is one canonical
//! message with the same data and allowed trailers, however the bytes arrive.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard::http1::verify;

fuzz_target!(|data: &[u8]| {
    let request = [&b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"[..], data].concat();
    if let Err(e) = verify::request_invariant(&request) {
        panic!("request: {e}\nbody: {:?}", String::from_utf8_lossy(data));
    }
    let response = [&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"[..], data].concat();
    for http10 in [false, true] {
        if let Err(e) = verify::response_invariant(&response, false, http10) {
            panic!("response (http10 {http10}): {e}\nbody: {:?}", String::from_utf8_lossy(data));
        }
    }
});
