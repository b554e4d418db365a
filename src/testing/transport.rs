//! A scripted client connection: the whole input is there at once (as if the client
//! pipelined everything), served in reads of chosen sizes; writes are collected.

use crate::connection::Transport;
use crate::hooks::TlsInfo;
use std::io::{self, Read, Write};
use std::time::Duration;

/// A tiny deterministic PRNG (xorshift64*), so read sizes can come from a fuzz input.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for this seed (any seed, zero included, gives a usable sequence).
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `1..=max` (`max` 0 counts as 1).
    pub fn size(&mut self, max: usize) -> usize {
        1 + (self.next_u64() % max.max(1) as u64) as usize
    }
}

/// How the input is cut into reads.
#[derive(Clone, Debug, Default)]
pub enum Reads {
    /// Everything left, in one read.
    #[default]
    Whole,
    /// These sizes in turn, cycling (zeros are skipped; none left means [`Reads::Whole`]).
    Cycle(Vec<usize>),
    /// Sizes drawn from `1..=max` by a [`Rng`].
    Random {
        /// The size generator.
        rng: Rng,
        /// The largest read.
        max: usize,
    },
}

/// What a `STARTTLS` handshake does on a [`MemoryTransport`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FakeTls {
    /// The handshake fails, so the connection ends.
    Fail,
    /// The handshake "succeeds" and the stream goes on in the clear, so the session after
    /// a handshake can be explored too.
    Succeed,
}

/// A [`Transport`] over a fixed input; by default STARTTLS is unsupported.
pub struct MemoryTransport {
    input: Vec<u8>,
    pos: usize,
    reads: Reads,
    next_cycle: usize,
    tls: Option<FakeTls>,
    /// Every byte the server wrote.
    pub output: Vec<u8>,
    /// Input offset and output length at each `start_tls` call.
    pub handshakes: Vec<(usize, usize)>,
}

impl MemoryTransport {
    /// Serves `input` in reads of the `segments` sizes, cycling (empty: all at once).
    pub fn new(input: &[u8], segments: &[usize]) -> MemoryTransport {
        let sizes: Vec<usize> = segments.iter().copied().filter(|&n| n > 0).collect();
        let reads = if sizes.is_empty() {
            Reads::Whole
        } else {
            Reads::Cycle(sizes)
        };
        MemoryTransport::with_reads(input, reads)
    }

    /// Serves `input` cut as `reads` says.
    pub fn with_reads(input: &[u8], reads: Reads) -> MemoryTransport {
        MemoryTransport {
            input: input.to_vec(),
            pos: 0,
            reads,
            next_cycle: 0,
            tls: None,
            output: Vec::new(),
            handshakes: Vec::new(),
        }
    }

    /// Makes `start_tls` behave as `tls` says instead of failing as unsupported.
    pub fn fake_tls(mut self, tls: FakeTls) -> MemoryTransport {
        self.tls = Some(tls);
        self
    }

    /// How many input bytes the server has read.
    pub fn consumed(&self) -> usize {
        self.pos
    }
}

impl Read for MemoryTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = buf.len().min(self.input.len() - self.pos);
        let n = match &mut self.reads {
            Reads::Whole => left,
            Reads::Cycle(sizes) if sizes.is_empty() => left,
            Reads::Cycle(sizes) => {
                let n = sizes[self.next_cycle % sizes.len()];
                self.next_cycle += 1;
                left.min(n)
            }
            Reads::Random { rng, max } => left.min(rng.size(*max)),
        };
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for MemoryTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for MemoryTransport {
    fn set_read_timeout(&mut self, _timeout: Option<Duration>) -> io::Result<()> {
        Ok(())
    }
    fn start_tls(&mut self) -> io::Result<TlsInfo> {
        self.handshakes.push((self.pos, self.output.len()));
        match self.tls {
            None => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS not available",
            )),
            Some(FakeTls::Fail) => Err(io::Error::new(io::ErrorKind::InvalidData, "no TLS here")),
            Some(FakeTls::Succeed) => Ok(TlsInfo {
                version: "TLSv1_3".into(),
                cipher: "FAKE".into(),
            }),
        }
    }
}
