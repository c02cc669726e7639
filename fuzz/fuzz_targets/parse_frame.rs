//! Any bytes a client sends as a text frame: parsed or refused with a code, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(e) = netra::protocol::parse_client_frame(text)
    {
        assert!(!e.message.is_empty());
        let frame = netra::protocol::error_frame(&e);
        assert!(serde_json::from_str::<serde_json::Value>(&frame).is_ok());
    }
});
