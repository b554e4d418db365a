//! Issue 15, real IMAP: runs `tests/dovecot.sh` (mailer delivers, a real Dovecot serves
//! the Maildirs; see the script and `tests/dovecot.py` for what is checked) as part of
//! `cargo test`, with the binary built for the tests.
//!
//! It needs root (Dovecot's mail processes and mailer run as `nobody`) and Dovecot
//! installed (`.ci/install-packages` does that in CI); without them it says so and
//! passes, so a developer's unprivileged `cargo test` still works.
use std::process::Command;

fn have_dovecot_as_root() -> Result<(), &'static str> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        return Err("not root");
    }
    let found = Command::new("sh")
        .args(["-c", "command -v dovecot"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        return Err("dovecot is not installed (apt-get install dovecot-imapd)");
    }
    Ok(())
}

#[test]
fn dovecot_serves_over_imap_what_mailer_delivers() {
    if let Err(why) = have_dovecot_as_root() {
        eprintln!("dovecot test skipped: {why}");
        return;
    }
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/dovecot.sh"))
        .env("MAILER_BIN", env!("CARGO_BIN_EXE_mailer"))
        .output()
        .expect("run tests/dovecot.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tests/dovecot.sh failed:\n{text}");
    assert!(text.contains("dovecot.sh: OK"), "{text}");
}
