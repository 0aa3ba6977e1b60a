//! RESP2, the Redis wire format, for the command connection: commands written straight into the
//! connection's output buffer, and replies parsed as they arrive.
//!
//! Only what the daemon's commands need: a command is an array of bulk strings; a reply is a simple
//! string, an error, an integer, a bulk string (or nil), or an array of replies (or nil). A reply is
//! parsed only once all of it has arrived, so a partial read costs a rescan of at most what is
//! buffered; replies to the daemon's commands are small, and a value is at most the protocol's
//! value limit plus a header.
//!
//! Nothing here panics on what Redis sends: a malformed reply is a [`ProtocolError`], after which
//! the connection cannot be trusted and is closed.

use bytes::{BufMut, Bytes, BytesMut};

/// The largest bulk string accepted: Redis's own limit on a string (`proto-max-bulk-len`).
pub const MAX_BULK: usize = 512 * 1024 * 1024;

/// The largest array accepted. The scripts answer with a handful of members.
pub const MAX_ARRAY: usize = 1024;

/// How deeply arrays may nest. The scripts answer flat arrays.
pub const MAX_DEPTH: usize = 4;

/// One command: its arguments, already encoded as bulk strings. Built with [`Command::arg`] and
/// friends, then appended to the connection's output with [`Command::write_to`].
#[derive(Debug, Default)]
pub struct Command {
    count: usize,
    body: BytesMut,
}

impl Command {
    /// A command whose first argument (its name) is `name`.
    pub fn new(name: &str) -> Command {
        let mut cmd = Command {
            count: 0,
            body: BytesMut::with_capacity(128),
        };
        cmd.arg(name.as_bytes());
        cmd
    }

    /// Appends one argument.
    pub fn arg(&mut self, arg: &[u8]) -> &mut Command {
        self.parts(&[arg])
    }

    /// Appends one argument made of `parts` joined, without joining them first: a key name is its
    /// prefix, its kind and the protocol key.
    pub fn parts(&mut self, parts: &[&[u8]]) -> &mut Command {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.body.put_u8(b'$');
        put_decimal(&mut self.body, len as u64);
        self.body.put_slice(b"\r\n");
        for part in parts {
            self.body.put_slice(part);
        }
        self.body.put_slice(b"\r\n");
        self.count += 1;
        self
    }

    /// Appends a number as a decimal argument.
    pub fn uint(&mut self, n: u64) -> &mut Command {
        let mut digits = itoa::Buffer::new();
        self.arg(digits.format(n).as_bytes())
    }

    /// Appends the whole command, header and arguments, to `out`.
    pub fn write_to(&self, out: &mut BytesMut) {
        out.reserve(16 + self.body.len());
        out.put_u8(b'*');
        put_decimal(out, self.count as u64);
        out.put_slice(b"\r\n");
        out.put_slice(&self.body);
    }

    /// The encoded size, for the output buffer's accounting.
    pub fn len(&self) -> usize {
        self.body.len() + 16
    }

    /// Never true: a command has at least its name.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

fn put_decimal(out: &mut BytesMut, n: u64) {
    let mut digits = itoa::Buffer::new();
    out.put_slice(digits.format(n).as_bytes());
}

/// One reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and the like.
    Simple(Bytes),
    /// `-ERR ...`: the whole message, its first word the error's kind (`NOSCRIPT`, `LOADING`, ...).
    Error(String),
    /// `:42`.
    Int(i64),
    /// `$3 abc`.
    Bulk(Bytes),
    /// `$-1` or `*-1` (a Lua `false` or `nil` too).
    Nil,
    /// `*N ...`.
    Array(Vec<Reply>),
}

impl Reply {
    /// The first word of an error reply (`NOSCRIPT`, `LOADING`, ...); `None` for other replies.
    pub fn error_kind(&self) -> Option<&str> {
        match self {
            Reply::Error(message) => message.split(' ').next(),
            _ => None,
        }
    }
}

/// Redis sent something that is not RESP2, or over the limits above.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed reply from Redis: {0}")]
pub struct ProtocolError(pub String);

/// Takes one whole reply off the front of `buf`; `Ok(None)` (and `buf` untouched) when it has not
/// all arrived yet.
pub fn take_reply(buf: &mut BytesMut) -> Result<Option<Reply>, ProtocolError> {
    let mut at = 0;
    let Some(end) = scan(buf, &mut at, 0)? else {
        return Ok(None);
    };
    let whole = buf.split_to(end).freeze();
    let mut at = 0;
    Ok(Some(build(&whole, &mut at)?))
}

/// Finds where the reply starting at `*at` ends, without building it: `None` when incomplete.
fn scan(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<usize>, ProtocolError> {
    let Some((kind, line)) = line(buf, at)? else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' | b':' => Ok(Some(*at)),
        b'$' => match length(line, MAX_BULK)? {
            None => Ok(Some(*at)),
            Some(len) => {
                let end = *at + len + 2;
                if buf.len() < end {
                    return Ok(None);
                }
                if &buf[end - 2..end] != b"\r\n" {
                    return Err(ProtocolError("bulk string not ended by CRLF".into()));
                }
                *at = end;
                Ok(Some(end))
            }
        },
        b'*' => {
            if depth >= MAX_DEPTH {
                return Err(ProtocolError(format!(
                    "arrays nested over {MAX_DEPTH} deep"
                )));
            }
            let Some(members) = length(line, MAX_ARRAY)? else {
                return Ok(Some(*at));
            };
            for _ in 0..members {
                if scan(buf, at, depth + 1)?.is_none() {
                    return Ok(None);
                }
            }
            Ok(Some(*at))
        }
        other => Err(ProtocolError(format!("reply type byte {other:#04x}"))),
    }
}

/// Builds the reply at `*at` of a buffer [`scan`] found whole.
fn build(buf: &Bytes, at: &mut usize) -> Result<Reply, ProtocolError> {
    let incomplete = || ProtocolError("reply ended early".into());
    let (kind, line) = line(buf, at)?.ok_or_else(incomplete)?;
    let line_start = *at - 2 - line.len();
    Ok(match kind {
        b'+' => Reply::Simple(buf.slice(line_start..line_start + line.len())),
        b'-' => Reply::Error(String::from_utf8_lossy(line).into_owned()),
        b':' => Reply::Int(integer(line)?),
        b'$' => match length(line, MAX_BULK)? {
            None => Reply::Nil,
            Some(len) => {
                let start = *at;
                *at += len + 2;
                Reply::Bulk(buf.slice(start..start + len))
            }
        },
        b'*' => match length(line, MAX_ARRAY)? {
            None => Reply::Nil,
            Some(members) => {
                let mut all = Vec::with_capacity(members);
                for _ in 0..members {
                    all.push(build(buf, at)?);
                }
                Reply::Array(all)
            }
        },
        other => return Err(ProtocolError(format!("reply type byte {other:#04x}"))),
    })
}

/// The type byte and the rest of the line at `*at` (CRLF excluded), moving `*at` past the CRLF;
/// `None` when the line has not all arrived.
fn line<'a>(buf: &'a [u8], at: &mut usize) -> Result<Option<(u8, &'a [u8])>, ProtocolError> {
    let rest = buf.get(*at..).unwrap_or_default();
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        if rest.len() > 64 * 1024 {
            return Err(ProtocolError("a reply line over 64 KiB".into()));
        }
        return Ok(None);
    };
    if rest.len() < cr + 2 {
        return Ok(None);
    }
    if rest[cr + 1] != b'\n' {
        return Err(ProtocolError("CR not followed by LF".into()));
    }
    let Some((&kind, line)) = rest[..cr].split_first() else {
        return Err(ProtocolError("empty reply line".into()));
    };
    *at += cr + 2;
    Ok(Some((kind, line)))
}

fn integer(line: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            ProtocolError(format!(
                "`{}` where an integer belongs",
                String::from_utf8_lossy(line)
            ))
        })
}

/// A bulk or array length: `None` for -1 (nil), an error past `max` or below -1.
fn length(line: &[u8], max: usize) -> Result<Option<usize>, ProtocolError> {
    match integer(line)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .ok()
            .filter(|&n| n <= max)
            .map(Some)
            .ok_or_else(|| ProtocolError(format!("length {n} out of range"))),
    }
}

/// Skips a whole buffer of replies (for tests and for draining): how many there were.
#[cfg(test)]
fn count_replies(mut buf: BytesMut) -> usize {
    use bytes::Buf;
    let mut n = 0;
    while let Ok(Some(_)) = take_reply(&mut buf) {
        n += 1;
    }
    assert!(!buf.has_remaining(), "left over: {buf:?}");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Option<Reply>, ProtocolError> {
        take_reply(&mut BytesMut::from(bytes))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut cmd = Command::new("EVALSHA");
        cmd.arg(b"abc")
            .uint(2)
            .parts(&[b"p:", b"l:", b"k"])
            .arg(b"")
            .uint(u64::MAX);
        let mut out = BytesMut::new();
        cmd.write_to(&mut out);
        assert_eq!(
            &out[..],
            b"*6\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n2\r\n$5\r\np:l:k\r\n$0\r\n\r\n$20\r\n18446744073709551615\r\n"
        );
        assert!(out.len() <= cmd.len());
    }

    #[test]
    fn every_reply_type_parses() {
        assert_eq!(
            parse(b"+OK\r\n"),
            Ok(Some(Reply::Simple(Bytes::from("OK"))))
        );
        assert_eq!(
            parse(b"-NOSCRIPT No matching script\r\n"),
            Ok(Some(Reply::Error("NOSCRIPT No matching script".into())))
        );
        assert_eq!(parse(b":-42\r\n"), Ok(Some(Reply::Int(-42))));
        assert_eq!(
            parse(b"$5\r\na\r\nbc\r\n"),
            Ok(Some(Reply::Bulk(Bytes::from("a\r\nbc"))))
        );
        assert_eq!(parse(b"$0\r\n\r\n"), Ok(Some(Reply::Bulk(Bytes::new()))));
        assert_eq!(parse(b"$-1\r\n"), Ok(Some(Reply::Nil)));
        assert_eq!(parse(b"*-1\r\n"), Ok(Some(Reply::Nil)));
        assert_eq!(
            parse(b"*3\r\n:1\r\n$2\r\n17\r\n*1\r\n$-1\r\n"),
            Ok(Some(Reply::Array(vec![
                Reply::Int(1),
                Reply::Bulk(Bytes::from("17")),
                Reply::Array(vec![Reply::Nil]),
            ])))
        );
        assert_eq!(
            Reply::Error("LOADING Redis is loading".into()).error_kind(),
            Some("LOADING")
        );
    }

    #[test]
    fn a_reply_is_taken_only_once_whole_and_never_split_wrongly() {
        let stream: &[u8] = b"*3\r\n:1\r\n$2\r\n17\r\n$3\r\nabc\r\n+OK\r\n:5\r\n";
        // Every cut: the first part gives whole replies only, and the rest completes them.
        for cut in 0..=stream.len() {
            let mut buf = BytesMut::from(&stream[..cut]);
            let mut got = Vec::new();
            while let Some(r) = take_reply(&mut buf).expect("well formed") {
                got.push(r);
            }
            buf.extend_from_slice(&stream[cut..]);
            while let Some(r) = take_reply(&mut buf).expect("well formed") {
                got.push(r);
            }
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert!(buf.is_empty());
        }
        assert_eq!(count_replies(BytesMut::from(stream)), 3);
    }

    #[test]
    fn malformed_replies_are_errors_not_panics() {
        for bad in [
            &b"?x\r\n"[..],
            b"\r\n",
            b":12a\r\n",
            b"$-2\r\n",
            b"$3\r\nabcXY",
            b"*-5\r\n",
            b"*99999999\r\n",
            b"$999999999999\r\n",
            b"+OK\rX",
            b"*1\r\n*1\r\n*1\r\n*1\r\n*1\r\n:1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        // A long line with no end is refused rather than buffered for ever.
        assert!(parse(&[b'+'; 70 * 1024]).is_err());
        // Every prefix of a good reply is incomplete, never an error.
        let good = b"*2\r\n$3\r\nabc\r\n:7\r\n";
        for cut in 0..good.len() {
            assert_eq!(parse(&good[..cut]), Ok(None), "cut at {cut}");
        }
    }
}
