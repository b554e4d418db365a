//! The JSON job (SPEC 6): what to send, to whom, and how.
//!
//! Parsing goes through a `serde_json::Value` by hand rather than a derived
//! `Deserialize`, so that every error names the field it is about (SPEC 6: "a message
//! naming the field") in words an operator understands.

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use serde_json::{Map, Value};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// When to pipeline MAIL, RCPT and DATA (RFC 2920).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pipelining {
    /// Pipeline when the server advertises PIPELINING.
    #[default]
    Try,
    /// Pipeline; a server that does not advertise PIPELINING is an error.
    Depend,
    /// Never pipeline: every command waits for its reply.
    No,
}

/// Whether to upgrade the connection with STARTTLS (RFC 3207).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartTls {
    /// Stay in plain text.
    No,
    /// Upgrade when the server advertises STARTTLS.
    #[default]
    Try,
    /// Upgrade; a server that does not advertise STARTTLS (or refuses it) is an error.
    Require,
}

/// Seconds allowed for the connection and for each reply when the job does not say.
pub const DEFAULT_TIMEOUT_SECS: u64 = 30;

/// Longest `connection_timeout` accepted: one day.
const MAX_TIMEOUT_SECS: f64 = 86_400.0;

/// One delivery: a raw message, its envelope and the server to give it to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Host name or IP address (an IPv6 address may be written in brackets).
    pub host: String,
    /// TCP port; 25 when the job does not say.
    pub port: u16,
    /// The name given in EHLO/HELO; the local host name when the job does not say.
    pub helo: String,
    /// Whether to pipeline commands (RFC 2920).
    pub pipelining: Pipelining,
    /// Bound on connecting (DNS included) and on waiting for each reply.
    pub connection_timeout: Duration,
    /// Whether to upgrade the connection with STARTTLS (RFC 3207).
    pub starttls: StartTls,
    /// Verify the server certificate and its name (false: accept any certificate,
    /// for self-signed test servers; handshake signatures are still checked).
    pub tls_verify: bool,
    /// PEM file with the CA certificates to trust instead of the public web roots.
    pub ca_file: Option<PathBuf>,
    /// The reverse-path; `None` is the null path `<>` (bounces, RFC 5321 §4.5.5).
    pub sender: Option<String>,
    /// Forward-paths, in order; never empty.
    pub recipients: Vec<String>,
    /// The raw RFC 5322 message (headers and body).
    pub message: Vec<u8>,
}

/// Why a job was refused. Every variant names the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// Not JSON, or not a JSON object.
    NotJson(String),
    /// A required field is absent.
    Missing(&'static str),
    /// A field has the wrong JSON type; `expected` says what it should be.
    WrongType {
        /// The field.
        field: String,
        /// The JSON type it should have.
        expected: &'static str,
    },
    /// A field has the right type but an unusable value.
    Invalid {
        /// The field.
        field: String,
        /// What is wrong with its value.
        reason: String,
    },
}

impl JobError {
    /// The field the error is about (`None` when the document is not a JSON object).
    pub fn field(&self) -> Option<&str> {
        match self {
            JobError::NotJson(_) => None,
            JobError::Missing(f) => Some(f),
            JobError::WrongType { field, .. } | JobError::Invalid { field, .. } => Some(field),
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::NotJson(e) => write!(f, "bad job: not a JSON object: {e}"),
            JobError::Missing(field) => write!(f, "bad job: missing field \"{field}\""),
            JobError::WrongType { field, expected } => {
                write!(f, "bad job: field \"{field}\" must be {expected}")
            }
            JobError::Invalid { field, reason } => {
                write!(f, "bad job: field \"{field}\": {reason}")
            }
        }
    }
}

impl std::error::Error for JobError {}

/// The fields a job may have; others are ignored (see [`Job::unknown_fields`]).
const FIELDS: &[&str] = &[
    "host",
    "port",
    "helo",
    "pipelining",
    "connection_timeout",
    "starttls",
    "tls_verify",
    "ca_file",
    "sender",
    "recipients",
    "message",
];

fn wrong(field: &str, expected: &'static str) -> JobError {
    JobError::WrongType {
        field: field.to_string(),
        expected,
    }
}

fn invalid(field: &str, reason: impl Into<String>) -> JobError {
    JobError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// An optional field: absent and `null` both mean "use the default".
fn opt<'a>(obj: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

fn opt_str<'a>(obj: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, JobError> {
    match opt(obj, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(wrong(field, "a string")),
    }
}

fn req_str<'a>(obj: &'a Map<String, Value>, field: &'static str) -> Result<&'a str, JobError> {
    match obj.get(field) {
        None => Err(JobError::Missing(field)),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(wrong(field, "a string")),
    }
}

/// A command argument must not carry bytes that would end or split the command line
/// (CR/LF would inject commands) or the angle brackets that delimit the path.
fn check_path(field: &str, s: &str) -> Result<(), JobError> {
    if s.is_empty() {
        return Err(invalid(field, "empty address"));
    }
    if let Some(c) = s.chars().find(|&c| c.is_control() || c == '<' || c == '>') {
        return Err(invalid(
            field,
            format!("character {c:?} not allowed in an address"),
        ));
    }
    Ok(())
}

/// `<a@b>` and `a@b` mean the same mailbox.
fn strip_brackets(s: &str) -> &str {
    s.strip_prefix('<')
        .and_then(|t| t.strip_suffix('>'))
        .unwrap_or(s)
}

/// The machine's host name for EHLO (RFC 5321 §4.1.4 wants the FQDN; the kernel's
/// name is the best we know without DNS), `localhost` when it cannot be read.
pub fn local_hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| valid_helo(s))
        .unwrap_or_else(|| "localhost".to_string())
}

fn valid_helo(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic())
}

/// base64 as people write it: standard alphabet, padding optional, whitespace
/// (line breaks from `base64 -w 76`) ignored.
fn decode_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    ENGINE.decode(compact)
}

impl Job {
    /// A job with every optional field at its default.
    pub fn new(
        host: impl Into<String>,
        sender: Option<String>,
        recipients: Vec<String>,
        message: Vec<u8>,
    ) -> Job {
        Job {
            host: host.into(),
            port: 25,
            helo: local_hostname(),
            pipelining: Pipelining::default(),
            connection_timeout: Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            starttls: StartTls::default(),
            tls_verify: true,
            ca_file: None,
            sender,
            recipients,
            message,
        }
    }

    /// Parses a job document (SPEC 6). Nothing is sent and no file is opened.
    pub fn from_json(bytes: &[u8]) -> Result<Job, JobError> {
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| JobError::NotJson(e.to_string()))?;
        let Value::Object(obj) = v else {
            return Err(JobError::NotJson("the document is not an object".into()));
        };

        let host = req_str(&obj, "host")?.to_string();
        let port = match opt(&obj, "port") {
            None => 25,
            Some(Value::Number(n)) => n
                .as_u64()
                .filter(|p| (1..=65535).contains(p))
                .map(|p| p as u16)
                .ok_or_else(|| invalid("port", format!("{n} is not a port (1-65535)")))?,
            Some(_) => return Err(wrong("port", "an integer")),
        };
        let helo = match opt_str(&obj, "helo")? {
            None => local_hostname(),
            Some(h) => h.to_string(),
        };
        let pipelining = match opt_str(&obj, "pipelining")? {
            None => Pipelining::default(),
            Some(s) => match s.to_ascii_uppercase().as_str() {
                "TRY" => Pipelining::Try,
                "DEPEND" => Pipelining::Depend,
                "NO" => Pipelining::No,
                _ => {
                    return Err(invalid(
                        "pipelining",
                        format!("{s:?} is not TRY, DEPEND or NO"),
                    ))
                }
            },
        };
        let connection_timeout = match opt(&obj, "connection_timeout") {
            None => Duration::from_secs(DEFAULT_TIMEOUT_SECS),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|s| *s > 0.0 && *s <= MAX_TIMEOUT_SECS)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| {
                    invalid(
                        "connection_timeout",
                        format!("{n} is not a number of seconds in (0, {MAX_TIMEOUT_SECS}]"),
                    )
                })?,
            Some(_) => return Err(wrong("connection_timeout", "a number of seconds")),
        };
        let starttls = match opt_str(&obj, "starttls")? {
            None => StartTls::default(),
            Some(s) => match s.to_ascii_uppercase().as_str() {
                "NO" => StartTls::No,
                "TRY" => StartTls::Try,
                "REQUIRE" => StartTls::Require,
                _ => {
                    return Err(invalid(
                        "starttls",
                        format!("{s:?} is not NO, TRY or REQUIRE"),
                    ))
                }
            },
        };
        let tls_verify = match opt(&obj, "tls_verify") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(wrong("tls_verify", "true or false")),
        };
        let ca_file = opt_str(&obj, "ca_file")?.map(PathBuf::from);
        // `sender` must be present (the example always has it) but may be null: `<>`.
        let sender = match obj.get("sender") {
            None => return Err(JobError::Missing("sender")),
            Some(Value::Null) => None,
            Some(Value::String(s)) if strip_brackets(s).is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(wrong("sender", "a string or null")),
        };
        let recipients = match obj.get("recipients") {
            None => return Err(JobError::Missing("recipients")),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, r)| match r {
                    Value::String(s) => Ok(s.clone()),
                    _ => Err(wrong(&format!("recipients[{i}]"), "a string")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(wrong("recipients", "an array of strings")),
        };
        let message = decode_base64(req_str(&obj, "message")?)
            .map_err(|e| invalid("message", format!("not valid base64: {e}")))?;

        let job = Job {
            host,
            port,
            helo,
            pipelining,
            connection_timeout,
            starttls,
            tls_verify,
            ca_file,
            sender,
            recipients,
            message,
        };
        job.validate()?;
        Ok(job)
    }

    /// Names of top-level fields that a job does not have (they are ignored; the CLI
    /// warns about them, since a typo would otherwise silently fall back to a default).
    pub fn unknown_fields(bytes: &[u8]) -> Vec<String> {
        match serde_json::from_slice::<Value>(bytes) {
            Ok(Value::Object(obj)) => obj
                .keys()
                .filter(|k| !FIELDS.contains(&k.as_str()))
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Checks what [`from_json`](Self::from_json) checks, for jobs built in code.
    pub fn validate(&self) -> Result<(), JobError> {
        let host = self.host_name();
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid(
                "host",
                format!("{:?} is not a host name", self.host),
            ));
        }
        if self.port == 0 {
            return Err(invalid("port", "0 is not a port (1-65535)"));
        }
        if !valid_helo(&self.helo) {
            return Err(invalid(
                "helo",
                format!(
                    "{:?} is not a host name (printable ASCII, no spaces)",
                    self.helo
                ),
            ));
        }
        if self.connection_timeout.is_zero() {
            return Err(invalid("connection_timeout", "must be more than 0 seconds"));
        }
        if let Some(s) = &self.sender {
            check_path("sender", strip_brackets(s))?;
        }
        if self.recipients.is_empty() {
            return Err(invalid("recipients", "must not be empty"));
        }
        for (i, r) in self.recipients.iter().enumerate() {
            check_path(&format!("recipients[{i}]"), strip_brackets(r))?;
        }
        Ok(())
    }

    /// The host without the brackets of an IPv6 literal.
    pub(crate) fn host_name(&self) -> &str {
        self.host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host)
    }

    /// The MAIL FROM path content (empty for `<>`).
    pub(crate) fn sender_path(&self) -> &str {
        self.sender.as_deref().map_or("", strip_brackets)
    }

    /// The RCPT TO path content of recipient `i`.
    pub(crate) fn recipient_path(&self, i: usize) -> &str {
        strip_brackets(&self.recipients[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"{ "host": "127.0.0.1", "port": 2525, "helo": "localhost",
      "pipelining": "TRY", "connection_timeout": 5,
      "starttls": "TRY", "sender": "foo@bar.test",
      "recipients": ["a@x.test", "b@x.test"], "message": "U3ViamVjdDogdGVzdA0KDQpUZXN0DQo=" }"#;

    fn with(field: &str, value: &str) -> String {
        let mut v: Value = serde_json::from_str(EXAMPLE).unwrap();
        let obj = v.as_object_mut().unwrap();
        if value == "<remove>" {
            obj.remove(field);
        } else {
            obj.insert(field.into(), serde_json::from_str(value).unwrap());
        }
        v.to_string()
    }

    fn err(field: &str, value: &str) -> JobError {
        Job::from_json(with(field, value).as_bytes()).unwrap_err()
    }

    #[test]
    fn spec_example_parses() {
        let j = Job::from_json(EXAMPLE.as_bytes()).unwrap();
        assert_eq!(j.host, "127.0.0.1");
        assert_eq!(j.port, 2525);
        assert_eq!(j.helo, "localhost");
        assert_eq!(j.pipelining, Pipelining::Try);
        assert_eq!(j.starttls, StartTls::Try);
        assert_eq!(j.connection_timeout, Duration::from_secs(5));
        assert!(j.tls_verify);
        assert_eq!(j.sender.as_deref(), Some("foo@bar.test"));
        assert_eq!(j.recipients, ["a@x.test", "b@x.test"]);
        assert_eq!(j.message, b"Subject: test\r\n\r\nTest\r\n");
    }

    #[test]
    fn defaults() {
        let doc = r#"{"host":"h","sender":null,"recipients":["a@b"],"message":""}"#;
        let j = Job::from_json(doc.as_bytes()).unwrap();
        assert_eq!(j.port, 25);
        assert_eq!(j.helo, local_hostname());
        assert_eq!(j.pipelining, Pipelining::Try);
        assert_eq!(j.starttls, StartTls::Try);
        assert!(j.tls_verify);
        assert_eq!(j.sender, None);
        assert_eq!(j.sender_path(), "");
        assert_eq!(
            j.connection_timeout,
            Duration::from_secs(DEFAULT_TIMEOUT_SECS)
        );
        assert!(j.message.is_empty());
    }

    #[test]
    fn modes_and_options() {
        let j = Job::from_json(with("pipelining", "\"DEPEND\"").as_bytes()).unwrap();
        assert_eq!(j.pipelining, Pipelining::Depend);
        let j = Job::from_json(with("pipelining", "\"no\"").as_bytes()).unwrap();
        assert_eq!(j.pipelining, Pipelining::No);
        let j = Job::from_json(with("starttls", "\"REQUIRE\"").as_bytes()).unwrap();
        assert_eq!(j.starttls, StartTls::Require);
        let j = Job::from_json(with("tls_verify", "false").as_bytes()).unwrap();
        assert!(!j.tls_verify);
        let j = Job::from_json(with("ca_file", "\"/x/ca.pem\"").as_bytes()).unwrap();
        assert_eq!(j.ca_file, Some(PathBuf::from("/x/ca.pem")));
        let j = Job::from_json(with("connection_timeout", "0.5").as_bytes()).unwrap();
        assert_eq!(j.connection_timeout, Duration::from_millis(500));
        let j = Job::from_json(with("sender", "\"<>\"").as_bytes()).unwrap();
        assert_eq!(j.sender, None);
        let j = Job::from_json(with("recipients", r#"["<a@b>"]"#).as_bytes()).unwrap();
        assert_eq!(j.recipient_path(0), "a@b");
        assert_eq!(j.recipients, ["<a@b>"]);
        let j = Job::from_json(with("host", "\"[::1]\"").as_bytes()).unwrap();
        assert_eq!(j.host_name(), "::1");
    }

    #[test]
    fn base64_is_forgiving_about_padding_and_line_breaks() {
        let j =
            Job::from_json(with("message", "\"U3ViamVjdDogdGVzdA0K\\nDQpUZXN0DQo\"").as_bytes())
                .unwrap();
        assert_eq!(j.message, b"Subject: test\r\n\r\nTest\r\n");
    }

    #[test]
    fn every_error_names_its_field() {
        let cases = [
            ("host", "<remove>", "host"),
            ("host", "7", "host"),
            ("host", "\"a b\"", "host"),
            ("port", "\"25\"", "port"),
            ("port", "0", "port"),
            ("port", "70000", "port"),
            ("port", "25.5", "port"),
            ("helo", "3", "helo"),
            ("helo", "\"two words\"", "helo"),
            ("pipelining", "\"MAYBE\"", "pipelining"),
            ("pipelining", "true", "pipelining"),
            ("connection_timeout", "\"5\"", "connection_timeout"),
            ("connection_timeout", "0", "connection_timeout"),
            ("connection_timeout", "-1", "connection_timeout"),
            ("starttls", "\"YES\"", "starttls"),
            ("tls_verify", "\"false\"", "tls_verify"),
            ("ca_file", "1", "ca_file"),
            ("sender", "<remove>", "sender"),
            ("sender", "[]", "sender"),
            ("sender", "\"a@b\\r\\nRSET\"", "sender"),
            ("recipients", "<remove>", "recipients"),
            ("recipients", "[]", "recipients"),
            ("recipients", "\"a@b\"", "recipients"),
            ("recipients", "[\"a@b\", 3]", "recipients[1]"),
            ("recipients", "[\"a@b\", \"\"]", "recipients[1]"),
            ("recipients", "[\"a>b\"]", "recipients[0]"),
            ("message", "<remove>", "message"),
            ("message", "null", "message"),
            ("message", "\"not base64!\"", "message"),
        ];
        for (field, value, named) in cases {
            let e = err(field, value);
            assert_eq!(e.field(), Some(named), "{field}={value}: {e}");
            assert!(e.to_string().contains(&format!("\"{named}\"")), "{e}");
        }
    }

    #[test]
    fn not_an_object() {
        for doc in ["", "[]", "{", "\"x\""] {
            let e = Job::from_json(doc.as_bytes()).unwrap_err();
            assert!(matches!(e, JobError::NotJson(_)), "{doc}: {e:?}");
        }
    }

    #[test]
    fn unknown_fields_are_listed() {
        assert!(Job::unknown_fields(EXAMPLE.as_bytes()).is_empty());
        assert_eq!(
            Job::unknown_fields(with("pipelinig", "\"NO\"").as_bytes()),
            ["pipelinig"]
        );
    }
}
