//! Where a message goes and what each stored copy looks like (SPEC 5, 8, 9; invariants 9
//! and 11).
//!
//! Two pure parts, unit-tested here without files or sockets:
//! - [`ContentFilter`] guards the content as it streams to the spool: content that
//!   starts with white space gets an empty line first (it could otherwise continue our
//!   `Received:` field, RFC 5322 §2.2.3 folding), and `Return-Path:` fields in the
//!   message's own header section are dropped (RFC 5321 §4.4: only final delivery adds
//!   one). It also finds where the header section ends.
//! - [`plan`] turns the envelope, each recipient's route and the data hooks' verdict
//!   into the list of [`Copy`]s the spool commits together: one for `spool.dir` when a
//!   recipient is not in a mailbox, one per distinct mailbox, each naming only the
//!   recipients that led to it (so a Bcc recipient stays invisible to the others).

use crate::hooks::{DataVerdict, Header, HeaderChange};
use crate::protocol::address::Address;
use crate::spool::Copy;
use std::path::PathBuf;

/// A recipient's route, answered by a Router (the `[mailboxes]` maps implement it).
pub trait Router: Send + Sync {
    /// `None`: not a mailbox-domain recipient; it is stored in `spool.dir` as in v1.
    /// `Some(list)`: the mailboxes it leads to (duplicates across the recipients of one
    /// message are merged into one copy per mailbox). An empty list is treated as
    /// `None`: a message is never accepted without being stored somewhere.
    fn route(&self, rcpt: &Address) -> Option<Vec<Mailbox>>;
}

/// A mailbox a recipient leads to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    /// The bare mailbox address, written as `Delivered-To:`.
    pub address: String,
    /// Its Maildir, `<root>/<domain>/<local>/`.
    pub maildir: PathBuf,
}

/// How long a line start may grow before we decide it is not a `Return-Path:` field
/// (the name plus generous obsolete white space before the colon, RFC 5322 §4.5.3).
const DECIDE_MAX: usize = 64;
const RETURN_PATH: &[u8] = b"return-path";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Nothing seen yet.
    First,
    /// In the header section, at the start of a line; `dropping` tells whether the
    /// previous field was dropped (its continuation lines go too).
    LineStart { dropping: bool },
    /// The start of a line is being collected in `held` to decide about it.
    Deciding,
    /// Passing (or dropping) the rest of a header line.
    InLine { dropping: bool },
    /// The body: everything passes.
    Body,
}

/// The streaming content guard (see the module docs). Feed it the content in pieces
/// of any size; it holds back at most [`DECIDE_MAX`] bytes.
#[derive(Debug)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct ContentFilter {
    state: State,
    held: Vec<u8>,
    /// Bytes emitted so far.
    emitted: u64,
    /// Where the header section ends in the emitted bytes (the empty line's offset).
    header_end: Option<u64>,
}

impl Default for ContentFilter {
    fn default() -> Self {
        ContentFilter {
            state: State::First,
            held: Vec::with_capacity(DECIDE_MAX + 1),
            emitted: 0,
            header_end: None,
        }
    }
}

impl ContentFilter {
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn new() -> ContentFilter {
        ContentFilter::default()
    }

    /// Filters `input`, appending what is to be stored to `out`.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let before = out.len();
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Body => {
                    out.extend_from_slice(&input[i..]);
                    break;
                }
                State::First => {
                    if matches!(input[i], b' ' | b'\t') {
                        // Postfix does the same: an empty line first, so the content
                        // is all body and cannot fold into the trace headers.
                        out.extend_from_slice(b"\r\n");
                        self.header_end = Some(0);
                        self.state = State::Body;
                    } else {
                        self.state = State::LineStart { dropping: false };
                    }
                }
                State::LineStart { dropping } => {
                    if matches!(input[i], b' ' | b'\t') {
                        self.state = State::InLine { dropping };
                    } else {
                        self.held.clear();
                        self.state = State::Deciding;
                    }
                }
                State::InLine { dropping } => {
                    let rest = &input[i..];
                    match rest.iter().position(|&b| b == b'\n') {
                        Some(n) => {
                            if !dropping {
                                out.extend_from_slice(&rest[..=n]);
                            }
                            i += n + 1;
                            self.state = State::LineStart { dropping };
                        }
                        None => {
                            if !dropping {
                                out.extend_from_slice(rest);
                            }
                            i = input.len();
                        }
                    }
                }
                State::Deciding => {
                    let b = input[i];
                    i += 1;
                    self.held.push(b);
                    self.decide(out, before);
                }
            }
        }
        self.emitted += (out.len() - before) as u64;
    }

    /// One more byte is in `held`: settle the line if we can.
    fn decide(&mut self, out: &mut Vec<u8>, before: usize) {
        let h = &self.held;
        if h == b"\r" {
            return;
        }
        if h == b"\r\n" || h == b"\n" {
            // The empty line: the header section ends here (RFC 5322 §2.1).
            self.header_end = Some(self.emitted + (out.len() - before) as u64);
            out.extend_from_slice(h);
            self.state = State::Body;
            return;
        }
        let last = h[h.len() - 1];
        let n = h.len().min(RETURN_PATH.len());
        let prefix_ok = h[..n].eq_ignore_ascii_case(&RETURN_PATH[..n]);
        let verdict = if !prefix_ok || last == b'\n' {
            Some(false)
        } else if h.len() <= RETURN_PATH.len() {
            None
        } else if last == b':' {
            Some(true)
        } else if matches!(last, b' ' | b'\t') && h.len() < DECIDE_MAX {
            None
        } else {
            Some(false)
        };
        match verdict {
            None => {}
            Some(drop) => {
                if !drop {
                    out.extend_from_slice(&self.held);
                }
                self.state = if last == b'\n' {
                    State::LineStart { dropping: drop }
                } else {
                    State::InLine { dropping: drop }
                };
                self.held.clear();
            }
        }
    }

    /// True once in the body, where every byte passes unchanged: the caller may then
    /// store its bytes directly and report them with [`pass`](Self::pass).
    pub(crate) fn is_body(&self) -> bool {
        self.state == State::Body
    }

    /// Counts `n` bytes stored directly (only in the body).
    pub(crate) fn pass(&mut self, n: usize) {
        self.emitted += n as u64;
    }

    /// The end of the content: releases anything held back.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.state == State::Deciding {
            out.extend_from_slice(&self.held);
            self.emitted += self.held.len() as u64;
            self.held.clear();
            self.state = State::InLine { dropping: false };
        }
    }

    /// The length of the stored header section: everything before the empty line that
    /// ends it, or all of the content when there is none.
    pub(crate) fn header_len(&self) -> u64 {
        self.header_end.unwrap_or(self.emitted)
    }
}

/// What [`plan`] needs besides the verdict.
pub(crate) struct PlanInput<'a> {
    /// The recipients as accepted, in order.
    pub rcpts: &'a [Address],
    /// Each recipient's route, in the same order (all `None` without a router).
    pub routes: &'a [Option<Vec<Mailbox>>],
    /// Renders `Return-Path:`, one `X-Original-To:` per given recipient, and
    /// `Received:` (SPEC 5), the same date and id for every copy.
    pub trace: &'a dyn Fn(&[Address]) -> Vec<u8>,
    /// The content's header section (its first [`ContentFilter::header_len`] bytes);
    /// needed only when the verdict inserts or changes fields.
    pub header_section: Option<&'a [u8]>,
}

/// The copies to store, or why the verdict cannot be applied (a hook bug: 451).
/// A discard verdict gives no copies.
pub(crate) fn plan(input: &PlanInput<'_>, verdict: &DataVerdict) -> Result<Vec<Copy>, String> {
    if verdict.discard {
        return Ok(Vec::new());
    }
    // Shared by every copy: the quarantine line and the added fields, below the trace.
    let mut below = Vec::new();
    if let Some(reason) = &verdict.quarantine {
        // The reason is a milter's text: keep it to one clean line.
        let clean: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        below.extend_from_slice(&Header::new("X-Quarantine", clean.trim()).to_bytes()?);
    }
    for h in &verdict.add {
        below.extend_from_slice(&h.to_bytes()?);
    }
    let headers = if verdict.insert.is_empty() && verdict.change.is_empty() {
        None
    } else {
        let section = input
            .header_section
            .ok_or("header section needed to insert or change fields")?;
        let edited = edit_header_section(section, &verdict.insert, &verdict.change)?;
        Some((section.len() as u64, edited))
    };
    let quarantine = verdict.quarantine.is_some();
    let mut copies = Vec::new();
    let mut spool_rcpts = Vec::new();
    // Distinct mailboxes in order of first appearance, each with its recipients.
    let mut boxes: Vec<(&Mailbox, Vec<Address>)> = Vec::new();
    for (i, rcpt) in input.rcpts.iter().enumerate() {
        match input
            .routes
            .get(i)
            .and_then(|r| r.as_ref())
            .filter(|l| !l.is_empty())
        {
            None => spool_rcpts.push(rcpt.clone()),
            Some(list) => {
                for mb in list {
                    let at = match boxes.iter().position(|(b, _)| b.maildir == mb.maildir) {
                        Some(at) => at,
                        None => {
                            boxes.push((mb, Vec::new()));
                            boxes.len() - 1
                        }
                    };
                    let led = &mut boxes[at].1;
                    if !led.contains(rcpt) {
                        led.push(rcpt.clone());
                    }
                }
            }
        }
    }
    if !spool_rcpts.is_empty() {
        let mut head = (input.trace)(&spool_rcpts);
        head.extend_from_slice(&below);
        copies.push(Copy {
            maildir: None,
            quarantine,
            head,
            headers: headers.clone(),
        });
    }
    for (mb, led) in boxes {
        let mut head = Header::new("Delivered-To", mb.address.as_str()).to_bytes()?;
        head.extend_from_slice(&(input.trace)(&led));
        head.extend_from_slice(&below);
        copies.push(Copy {
            maildir: Some(mb.maildir.clone()),
            quarantine,
            head,
            headers: headers.clone(),
        });
    }
    Ok(copies)
}

/// Splits a header section into fields (a field with its continuation lines).
fn fields(section: &[u8]) -> Vec<&[u8]> {
    let mut out: Vec<&[u8]> = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < section.len() {
        let end = section[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(section.len(), |n| pos + n + 1);
        let continuation = pos > start && matches!(section[pos], b' ' | b'\t');
        if !continuation && pos > start {
            out.push(&section[start..pos]);
            start = pos;
        }
        pos = end;
    }
    if start < section.len() {
        out.push(&section[start..]);
    }
    out
}

fn field_name(field: &[u8]) -> &[u8] {
    let colon = field.iter().position(|&b| b == b':').unwrap_or(0);
    let name = &field[..colon];
    let trimmed = name.len()
        - name
            .iter()
            .rev()
            .take_while(|&&b| b == b' ' || b == b'\t')
            .count();
    &name[..trimmed]
}

/// Applies a milter's header changes (`chgheader`: by name and 1-based occurrence;
/// a missing occurrence is added at the end, as Postfix does) and then its inserts
/// (`insheader`: by index, 0 = first), returning the new header section.
pub(crate) fn edit_header_section(
    section: &[u8],
    insert: &[(usize, Header)],
    change: &[HeaderChange],
) -> Result<Vec<u8>, String> {
    let mut list: Vec<Vec<u8>> = fields(section).into_iter().map(<[u8]>::to_vec).collect();
    // A section not ending in a line break would glue a field to the next one.
    if let Some(last) = list.last_mut() {
        if !last.ends_with(b"\n") {
            last.extend_from_slice(b"\r\n");
        }
    }
    for c in change {
        let mut seen = 0;
        let at = list.iter().position(|f| {
            if field_name(f).eq_ignore_ascii_case(c.name.as_bytes()) {
                seen += 1;
                seen == c.index
            } else {
                false
            }
        });
        match (at, &c.value) {
            (Some(at), Some(v)) => {
                // The field keeps its name as the message spelled it.
                let name = String::from_utf8_lossy(field_name(&list[at])).into_owned();
                list[at] = Header::new(name, v.as_str()).to_bytes()?
            }
            (Some(at), None) => {
                list.remove(at);
            }
            (None, Some(v)) => list.push(Header::new(c.name.as_str(), v.as_str()).to_bytes()?),
            (None, None) => {}
        }
    }
    for (index, h) in insert {
        let bytes = h.to_bytes()?;
        let at = (*index).min(list.len());
        list.insert(at, bytes);
    }
    Ok(list.concat())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter_in_pieces(input: &[u8], piece: usize) -> (Vec<u8>, u64) {
        let mut f = ContentFilter::new();
        let mut out = Vec::new();
        for c in input.chunks(piece.max(1)) {
            f.push(c, &mut out);
        }
        f.finish(&mut out);
        (out, f.header_len())
    }

    fn filtered(input: &[u8]) -> (Vec<u8>, u64) {
        let whole = filter_in_pieces(input, input.len());
        // Any split of the input gives the same bytes.
        for piece in 1..=input.len().min(20) {
            assert_eq!(filter_in_pieces(input, piece), whole, "piece {piece}");
        }
        whole
    }

    #[test]
    fn leading_white_space_gets_an_empty_line_first() {
        assert_eq!(
            filtered(b" (authenticated as ceo)\r\nSubject: x\r\n\r\nb\r\n"),
            (
                b"\r\n (authenticated as ceo)\r\nSubject: x\r\n\r\nb\r\n".to_vec(),
                0
            )
        );
        assert_eq!(filtered(b"\tx\r\n").0, b"\r\n\tx\r\n");
        assert_eq!(filtered(b""), (Vec::new(), 0));
    }

    #[test]
    fn return_path_fields_are_dropped_from_the_header_section_only() {
        let input = b"Return-Path: <forged@x.test>\r\nSubject: s\r\nreturn-path  :\r\n <folded@x.test>\r\nX: y\r\n\r\nReturn-Path: <in body>\r\n";
        let (out, hl) = filtered(input);
        let want = b"Subject: s\r\nX: y\r\n\r\nReturn-Path: <in body>\r\n";
        assert_eq!(out, want);
        assert_eq!(hl, b"Subject: s\r\nX: y\r\n".len() as u64);
    }

    #[test]
    fn near_misses_are_kept() {
        let input = b"Return-Paths: a\r\nReturn: b\r\nReturn-Path-X: c\r\nReturn\r\n\r\n";
        assert_eq!(filtered(input).0, input);
        let no_body = b"Subject: s\r\nReturn-Pa";
        assert_eq!(filtered(no_body), (no_body.to_vec(), no_body.len() as u64));
        assert_eq!(filtered(b"Return-Path: x").0, b"");
    }

    proptest::proptest! {
        /// However the content is cut, the stored bytes and the header length are the
        /// same; the output never holds an incoming `Return-Path:` field in its header
        /// section and never starts with white space.
        #[test]
        fn any_split_gives_the_same_guarded_bytes(
            body in proptest::collection::vec(proptest::sample::select(
                b"Return-Path: \r\n\t ab:".to_vec()), 0..200),
            cuts in proptest::collection::vec(0usize..200, 0..6),
        ) {
            let whole = filter_in_pieces(&body, body.len().max(1));
            let mut f = ContentFilter::new();
            let mut out = Vec::new();
            let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
            bounds.extend([0, body.len()]);
            bounds.sort_unstable();
            for w in bounds.windows(2) {
                f.push(&body[w[0]..w[1]], &mut out);
            }
            f.finish(&mut out);
            proptest::prop_assert_eq!(&(out.clone(), f.header_len()), &whole);
            proptest::prop_assert!(!out.starts_with(b" ") && !out.starts_with(b"\t"));
            let headers = &out[..f.header_len() as usize];
            let starts = std::iter::once(0).chain(
                headers.iter().enumerate().filter(|(_, &b)| b == b'\n').map(|(i, _)| i + 1));
            for at in starts {
                let line = &headers[at..];
                let n = line.len().min(12);
                proptest::prop_assert!(!line[..n].eq_ignore_ascii_case(&b"return-path:"[..n]) || n < 12);
            }
        }
    }

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    fn mb(a: &str) -> Mailbox {
        Mailbox {
            address: a.into(),
            maildir: PathBuf::from(format!("/m/{a}")),
        }
    }

    fn trace(rcpts: &[Address]) -> Vec<u8> {
        let mut h = b"Return-Path: <s@x.test>\r\n".to_vec();
        for r in rcpts {
            h.extend_from_slice(format!("X-Original-To: {r}\r\n").as_bytes());
        }
        h.extend_from_slice(b"Received: R\r\n");
        h
    }

    fn heads(copies: &[Copy]) -> Vec<(Option<PathBuf>, String)> {
        copies
            .iter()
            .map(|c| {
                (
                    c.maildir.clone(),
                    String::from_utf8(c.head.clone()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn each_mailbox_copy_names_only_its_recipients_and_the_spool_gets_the_rest() {
        let rcpts = [
            addr("a@m.test"),
            addr("ext@o.test"),
            addr("b@m.test"),
            addr("alias@m.test"),
        ];
        let routes = [
            Some(vec![mb("a@m.test")]),
            None,
            Some(vec![mb("b@m.test")]),
            Some(vec![mb("a@m.test"), mb("b@m.test")]),
        ];
        let input = PlanInput {
            rcpts: &rcpts,
            routes: &routes,
            trace: &trace,
            header_section: None,
        };
        let copies = plan(&input, &DataVerdict::default()).unwrap();
        assert_eq!(
            heads(&copies),
            [
                (
                    None,
                    "Return-Path: <s@x.test>\r\nX-Original-To: ext@o.test\r\nReceived: R\r\n".into()
                ),
                (
                    Some("/m/a@m.test".into()),
                    "Delivered-To: a@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: a@m.test\r\nX-Original-To: alias@m.test\r\nReceived: R\r\n".into()
                ),
                (
                    Some("/m/b@m.test".into()),
                    "Delivered-To: b@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: b@m.test\r\nX-Original-To: alias@m.test\r\nReceived: R\r\n".into()
                ),
            ]
        );
        assert!(copies.iter().all(|c| !c.quarantine && c.headers.is_none()));
    }

    #[test]
    fn a_recipient_routed_nowhere_goes_to_the_spool() {
        let rcpts = [addr("a@m.test"), addr("lost@m.test")];
        let routes = [Some(vec![mb("a@m.test")]), Some(Vec::new())];
        let input = PlanInput {
            rcpts: &rcpts,
            routes: &routes,
            trace: &trace,
            header_section: None,
        };
        let copies = plan(&input, &DataVerdict::default()).unwrap();
        assert_eq!(copies.len(), 2);
        assert_eq!(copies[0].maildir, None);
        assert!(String::from_utf8_lossy(&copies[0].head).contains("X-Original-To: lost@m.test\r\n"));
    }

    #[test]
    fn without_routes_everything_goes_to_the_spool() {
        let rcpts = [addr("a@m.test"), addr("b@m.test")];
        let input = PlanInput {
            rcpts: &rcpts,
            routes: &[],
            trace: &trace,
            header_section: None,
        };
        let copies = plan(&input, &DataVerdict::default()).unwrap();
        assert_eq!(copies.len(), 1);
        assert_eq!(
            copies[0].head,
            b"Return-Path: <s@x.test>\r\nX-Original-To: a@m.test\r\nX-Original-To: b@m.test\r\nReceived: R\r\n"
        );
    }

    #[test]
    fn verdicts_add_quarantine_discard_and_edit() {
        let rcpts = [addr("a@m.test")];
        let routes = [Some(vec![mb("a@m.test")])];
        let input = PlanInput {
            rcpts: &rcpts,
            routes: &routes,
            trace: &trace,
            header_section: Some(b"Subject: s\r\nX-A: 1\r\nX-A: 2\r\n"),
        };
        let v = DataVerdict {
            add: vec![Header::new("X-Spam", "no")],
            insert: vec![(0, Header::new("DKIM-Signature", "v=1"))],
            change: vec![
                HeaderChange {
                    name: "x-a".into(),
                    index: 2,
                    value: Some("two".into()),
                },
                HeaderChange {
                    name: "Subject".into(),
                    index: 1,
                    value: None,
                },
            ],
            quarantine: Some("virus\r\nfound".into()),
            discard: false,
        };
        let copies = plan(&input, &v).unwrap();
        assert_eq!(copies.len(), 1);
        assert!(copies[0].quarantine);
        assert_eq!(
            String::from_utf8(copies[0].head.clone()).unwrap(),
            "Delivered-To: a@m.test\r\nReturn-Path: <s@x.test>\r\nX-Original-To: a@m.test\r\nReceived: R\r\nX-Quarantine: virus  found\r\nX-Spam: no\r\n"
        );
        let (len, section) = copies[0].headers.clone().unwrap();
        assert_eq!(len, 28);
        assert_eq!(section, b"DKIM-Signature: v=1\r\nX-A: 1\r\nX-A: two\r\n");
        let discard = DataVerdict {
            discard: true,
            ..v.clone()
        };
        assert!(plan(&input, &discard).unwrap().is_empty());
        let bad = DataVerdict {
            add: vec![Header::new("Bad Name", "x")],
            ..DataVerdict::default()
        };
        assert!(plan(&input, &bad).is_err());
    }

    #[test]
    fn header_fields_keep_their_continuations() {
        let s = b"A: 1\r\n 2\r\nB: 3\r\n";
        assert_eq!(fields(s), [&b"A: 1\r\n 2\r\n"[..], b"B: 3\r\n"]);
        let out = edit_header_section(s, &[(9, Header::new("C", "4"))], &[]).unwrap();
        assert_eq!(out, b"A: 1\r\n 2\r\nB: 3\r\nC: 4\r\n");
    }
}
