//! Arbitrary bytes sent to the control socket's request reader: a request
//! or an error reply, never a panic; and arbitrary bytes read as a reply by
//! the client side, a status or an event line of `drover events` (which
//! prints as text whatever parses).
#![no_main]

use drover::supervisor::control::read_request;
use drover::supervisor::live::LiveEvent;
use drover::supervisor::protocol::Response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
    let big = tokio::sync::Semaphore::new(1);
    let reply = match rt.block_on(read_request(data, &big)) {
        // A request that parses must survive a round trip unchanged.
        Ok((req, _)) => {
            let again = serde_json::to_vec(&req).expect("request serializes");
            let back = serde_json::from_slice(&again).expect("serialized request parses");
            assert_eq!(req, back);
            return;
        }
        Err(message) => Response::Error { message },
    };
    serde_json::to_vec(&reply).expect("error reply serializes");
    let _ = serde_json::from_slice::<Response>(data);
    if let Ok(ev) = serde_json::from_slice::<LiveEvent>(data) {
        let _ = ev.to_string();
    }
});
