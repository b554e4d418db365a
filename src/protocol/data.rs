//! The DATA reader (RFC 5321 §4.5.2, §4.1.1.4): removes dot-stuffing, finds the end of
//! data, normalises bare LF and enforces the size limit, one buffer at a time.
//!
//! End of data is `<CRLF>.<CRLF>` and nothing else (SPEC invariant 2, CVE-2023-51764):
//! the state only reaches [`State::LineStart`] through a real CRLF (or the start of
//! data), and only `LineStart '.' CR LF` ends the message. `<LF>.<LF>`, `<LF>.<CRLF>`,
//! `<CR>.<CR>` are content.

/// What to do with a bare LF (one not preceded by CR) in message content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum BareLf {
    /// Store it as CRLF.
    Normalize,
    /// Refuse the whole message (after its real end) with 550 5.5.2.
    Reject,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// At the start of a line: after the DATA command's CRLF or a CRLF in content.
    LineStart,
    /// Inside a line.
    Mid,
    /// Saw CR inside a line; it is held back until we know whether LF follows.
    Cr,
    /// Saw `.` at line start (it is dropped: dot-stuffing or the terminator).
    Dot,
    /// Saw `.CR` at line start.
    DotCr,
    Done,
}

/// How a finished message turned out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub enum Verdict {
    Ok,
    /// More content than the limit: it was discarded, not buffered (invariant 4).
    TooBig,
    /// Bare LF seen with [`BareLf::Reject`].
    BareLf,
}

/// Streaming DATA decoder. Feed it raw bytes; it appends content to `out`.
#[derive(Debug)]
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub struct DataReader {
    state: State,
    bare_lf: BareLf,
    max_size: u64,
    size: u64,
    too_big: bool,
    saw_bare_lf: bool,
}

impl DataReader {
    /// `max_size` bounds the content bytes kept; beyond it content is dropped.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn new(max_size: u64, bare_lf: BareLf) -> DataReader {
        DataReader {
            state: State::LineStart,
            bare_lf,
            max_size,
            size: 0,
            too_big: false,
            saw_bare_lf: false,
        }
    }

    /// Content bytes seen so far (including any discarded past the limit).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn size(&self) -> u64 {
        self.size
    }

    /// True once the terminating `<CRLF>.<CRLF>` has been consumed.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The verdict; meaningful once [`is_done`](Self::is_done).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn verdict(&self) -> Verdict {
        if self.too_big {
            Verdict::TooBig
        } else if self.saw_bare_lf && self.bare_lf == BareLf::Reject {
            Verdict::BareLf
        } else {
            Verdict::Ok
        }
    }

    /// Whether content is still worth writing (not over size, not doomed by bare LF).
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn is_keeping(&self) -> bool {
        self.verdict() == Verdict::Ok
    }

    /// Consumes bytes from `input` up to and including the terminator; returns how many
    /// were consumed. Bytes after the terminator (pipelined commands) are left alone.
    #[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            if self.state == State::Mid {
                // Fast path: copy up to the next CR or LF in one go.
                let run = input[i..]
                    .iter()
                    .position(|&b| b == b'\r' || b == b'\n')
                    .unwrap_or(input.len() - i);
                self.emit(&input[i..i + run], out);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            self.step(b, out);
        }
        i
    }

    fn step(&mut self, b: u8, out: &mut Vec<u8>) {
        match (self.state, b) {
            (State::LineStart, b'.') => self.state = State::Dot,
            (State::Dot, b'\r') => self.state = State::DotCr,
            (State::DotCr, b'\n') => self.state = State::Done,
            (State::DotCr, _) => {
                // `.CR` then not LF: the dot was stuffing; the CR is content.
                self.state = State::Cr;
                self.step(b, out);
            }
            (State::Cr, b'\n') => {
                self.emit(b"\r\n", out);
                self.state = State::LineStart;
            }
            (State::Cr, b'\r') => self.emit(b"\r", out), // bare CR kept; stay in Cr
            (State::Cr, _) => {
                self.emit(b"\r", out);
                self.state = State::Mid;
                self.step(b, out);
            }
            (_, b'\r') => self.state = State::Cr,
            (_, b'\n') => {
                // Bare LF: stored as CRLF, yet never a line start for the terminator.
                self.saw_bare_lf = true;
                self.emit(b"\r\n", out);
                self.state = State::Mid;
            }
            (State::Done, _) => {}
            (_, _) => {
                self.emit(&[b], out);
                self.state = State::Mid;
            }
        }
    }

    fn emit(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.size += bytes.len() as u64;
        if self.size > self.max_size {
            self.too_big = true;
        }
        if self.is_keeping() {
            out.extend_from_slice(bytes);
        }
    }
}

/// Applies dot-stuffing (RFC 5321 §4.5.2) for sending `content` with DATA and appends
/// the terminator; bare LF becomes CRLF. The client side of [`DataReader`].
#[cfg_attr(not(feature = "testing"), allow(unreachable_pub))]
pub fn dot_stuff(content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + content.len() / 64 + 5);
    let mut line_start = true;
    let mut prev = 0u8;
    for &b in content {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
        prev = b;
    }
    if !line_start {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_all(input: &[u8], bare: BareLf) -> (Vec<u8>, usize, DataReader) {
        let mut r = DataReader::new(1 << 20, bare);
        let mut out = Vec::new();
        let n = r.feed(input, &mut out);
        (out, n, r)
    }

    #[test]
    fn simple_message_and_leftover() {
        let (out, n, r) = read_all(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n", BareLf::Normalize);
        assert!(r.is_done());
        assert_eq!(out, b"Subject: x\r\n\r\nhi\r\n");
        assert_eq!(n, 21);
    }

    #[test]
    fn empty_message() {
        let (out, _, r) = read_all(b".\r\n", BareLf::Normalize);
        assert!(r.is_done());
        assert!(out.is_empty());
    }

    #[test]
    fn dot_unstuffing() {
        let (out, _, r) = read_all(b"..a\r\n...\r\n.\r\n", BareLf::Normalize);
        assert!(r.is_done());
        assert_eq!(out, b".a\r\n..\r\n");
    }

    #[test]
    fn smuggling_shapes_never_end_data() {
        for shape in [
            &b"a\n.\nb"[..],
            b"a\n.\r\nb",
            b"a\r\n.\nb",
            b"a\r.\rb",
            b"a\r.\r\nb",
        ] {
            let (_, n, r) = read_all(shape, BareLf::Normalize);
            assert!(!r.is_done(), "{shape:?} ended data");
            assert_eq!(n, shape.len());
        }
    }

    #[test]
    fn bare_lf_is_normalized_or_flagged() {
        let (out, _, r) = read_all(b"a\nb\n.\nc\r\n.\r\n", BareLf::Normalize);
        assert!(r.is_done());
        assert_eq!(out, b"a\r\nb\r\n.\r\nc\r\n");
        assert_eq!(r.verdict(), Verdict::Ok);
        let (out, _, r) = read_all(b"a\nb\r\n.\r\n", BareLf::Reject);
        assert!(r.is_done());
        assert_eq!(r.verdict(), Verdict::BareLf);
        assert!(out.len() <= 3, "content after a doomed bare LF is not kept");
    }

    #[test]
    fn bare_cr_is_kept() {
        let (out, _, r) = read_all(b"a\rb\r\r\n.\r\n", BareLf::Reject);
        assert_eq!(r.verdict(), Verdict::Ok);
        assert_eq!(out, b"a\rb\r\r\n");
    }

    #[test]
    fn oversize_is_drained_not_kept() {
        let mut r = DataReader::new(10, BareLf::Normalize);
        let mut out = Vec::new();
        let body = [b'x'; 100];
        r.feed(&body, &mut out);
        r.feed(b"\r\n.\r\n", &mut out);
        assert!(r.is_done());
        assert_eq!(r.verdict(), Verdict::TooBig);
        assert!(out.len() <= 10);
    }

    #[test]
    fn dot_stuff_examples() {
        assert_eq!(dot_stuff(b".a\r\nb"), b"..a\r\nb\r\n.\r\n");
        assert_eq!(dot_stuff(b"a\nb\r\n"), b"a\r\nb\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }

    proptest! {
        /// Stuffing then reading, split at any point, gives back the CRLF-normalised
        /// content (the client/server round trip is the identity on normalised text).
        #[test]
        fn stuff_then_read_is_identity(content in proptest::collection::vec(
            prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a'), any::<u8>()], 0..200),
            split in 0usize..400)
        {
            let wire = dot_stuff(&content);
            let mut expected = Vec::new();
            let mut prev = 0u8;
            for &b in &content {
                if b == b'\n' && prev != b'\r' { expected.push(b'\r'); }
                expected.push(b);
                prev = b;
            }
            if !expected.is_empty() && !expected.ends_with(b"\r\n") {
                expected.extend_from_slice(b"\r\n");
            }
            let mut r = DataReader::new(1 << 20, BareLf::Normalize);
            let mut out = Vec::new();
            let k = split.min(wire.len());
            let a = r.feed(&wire[..k], &mut out);
            prop_assert_eq!(a, k);
            let b = r.feed(&wire[k..], &mut out);
            prop_assert!(r.is_done());
            prop_assert_eq!(a + b, wire.len());
            prop_assert_eq!(out, expected);
        }

        /// However bytes are split across reads, the result is the same.
        #[test]
        fn splitting_does_not_matter(input in proptest::collection::vec(
            prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), any::<u8>()], 0..200),
            split in 0usize..200)
        {
            let (whole, n1, r1) = read_all(&input, BareLf::Normalize);
            let k = split.min(input.len());
            let mut r2 = DataReader::new(1 << 20, BareLf::Normalize);
            let mut out = Vec::new();
            let mut n2 = r2.feed(&input[..k], &mut out);
            if !r2.is_done() { n2 += r2.feed(&input[k..], &mut out); }
            prop_assert_eq!(whole, out);
            prop_assert_eq!(n1, n2);
            prop_assert_eq!(r1.is_done(), r2.is_done());
        }
    }
}
