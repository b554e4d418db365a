//! The address parser `mailer::protocol::address` (RFC 5321 §4.1.2, §4.5.3.1; RFC 6531).
//!
//! Properties:
//! - never panics;
//! - an accepted mailbox is kept as written, is `local@domain` (or bare Postmaster),
//!   respects the 64/255-octet limits, contains no control or bidi character (it goes
//!   into the stored trace headers and the log), reparses to itself, and is UTF-8 iff non-ASCII;
//! - an accepted mailbox in angle brackets is accepted by `split_path` as a whole path
//!   when it fits the 256-octet path limit, with nothing left over;
//! - `split_path` returns an inner text within the 256-octet path limit and a rest that
//!   is empty or starts with a space (parameters);
//! - an accepted domain is non-empty, at most 255 octets, made of non-empty labels of at
//!   most 63 octets without leading or trailing hyphen.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailer::protocol::address::{check_domain, split_path, Address, MAX_PATH};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(a) = Address::parse(s) {
        assert_eq!(a.as_str(), s);
        assert!(
            !s.bytes().any(|b| b < 32 || b == 127),
            "control char in {s:?}"
        );
        // Invariant 11: no C1 control, bidi or invisible formatting character either.
        assert!(
            !s.chars()
                .any(|c| c.is_control() || mailer::logsafe::is_bidi_or_invisible(c)),
            "control or bidi character in {s:?}"
        );
        assert_eq!(a.is_utf8(), !s.is_ascii());
        assert_eq!(Address::parse(a.as_str()).as_ref(), Ok(&a));
        match a.domain() {
            Some(d) => {
                assert_eq!(format!("{}@{d}", a.local_part()), s);
                assert!(!a.local_part().is_empty() && a.local_part().len() <= 64);
                assert!(!d.is_empty() && d.len() <= 255);
            }
            None => assert!(s.eq_ignore_ascii_case("postmaster")),
        }
        let bracketed = format!("<{s}>");
        if bracketed.len() <= MAX_PATH {
            assert_eq!(
                split_path(&bracketed),
                Ok((s, "")),
                "accepted mailbox not accepted as a path"
            );
        }
    }
    if let Ok((inner, rest)) = split_path(s) {
        assert!(rest.is_empty() || rest.starts_with(' '), "{rest:?}");
        assert!(
            inner.len() <= MAX_PATH,
            "inner path of {} octets",
            inner.len()
        );
        let trimmed = s.trim_start_matches(' ');
        if trimmed.starts_with('<') {
            let path_len = trimmed.len() - rest.len();
            assert!(path_len <= MAX_PATH, "path of {path_len} octets accepted");
        } else {
            assert!(
                inner.len() + 2 <= MAX_PATH,
                "path of {} octets accepted",
                inner.len() + 2
            );
        }
    }
    if check_domain(s).is_ok() {
        assert!(!s.is_empty() && s.len() <= 255);
        for label in s.split('.') {
            assert!(!label.is_empty() && label.len() <= 63, "label {label:?}");
            assert!(!label.starts_with('-') && !label.ends_with('-'));
            assert!(
                !label.contains(|c: char| c.is_ascii() && !c.is_ascii_alphanumeric() && c != '-')
            );
        }
    }
});
