//! Any URL with a password put in it: the masked form never shows the password, unless
//! the text around it (which masking keeps) happens to spell it too.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str)| {
    let (password, rest) = input;
    if password.len() < 6 || rest.contains('@') {
        return;
    }
    let url = format!("postgres://netra:{password}@{rest}");
    let shown = netra::config::mask_url(&url);
    let kept = format!("postgres://netra:***@{rest}");
    assert!(!shown.contains(password) || kept.contains(password), "{url:?} -> {shown:?}");
});
