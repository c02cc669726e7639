//! Any token text: verified or refused, never a panic, never a user from garbage.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use netra::auth::{Keys, TokenKind};
use netra::config::Secret;

static KEYS: LazyLock<Keys> = LazyLock::new(|| Keys::new(&Secret::new("fuzzing-secret-0123456789abcdef")));

fuzz_target!(|data: &[u8]| {
    if let Ok(token) = std::str::from_utf8(data) {
        // Without the secret no input can be signed, so nothing may verify.
        assert!(KEYS.verify(token, TokenKind::Access).is_err());
        assert!(KEYS.verify(token, TokenKind::Refresh).is_err());
    }
});
