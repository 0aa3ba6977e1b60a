//! Framing: every frame is a 4-byte big-endian length followed by that many bytes of one MessagePack value.

use bytes::{Buf, BytesMut};

/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;

/// A length prefix that announces a body over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("frame of {len} bytes is over the {max} byte limit")]
pub struct FrameTooLarge {
    /// The length the prefix announced.
    pub len: usize,
    /// The limit in force.
    pub max: usize,
}

/// Takes one complete frame body off the front of `buf`, or `None` when the frame is not all there yet.
/// Checks the announced length against `max` before waiting for the body, so a huge prefix is refused
/// without buffering anything. It reserves nothing for the missing bytes: memory for a frame is taken
/// as its bytes arrive, never on the word of its length prefix alone.
pub fn take_frame(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, FrameTooLarge> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return Err(FrameTooLarge { len, max });
    }
    if buf.len() < LEN_PREFIX + len {
        return Ok(None);
    }
    buf.advance(LEN_PREFIX);
    Ok(Some(buf.split_to(len)))
}

/// How many bytes the frame at the front of `buf` still lacks: 0 when [`take_frame`] with the same
/// `max` would answer at once (a whole frame, or a length prefix over `max`), otherwise at least 1.
pub fn missing(buf: &[u8], max: usize) -> usize {
    if buf.len() < LEN_PREFIX {
        return LEN_PREFIX - buf.len();
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > max {
        return 0;
    }
    (LEN_PREFIX + len).saturating_sub(buf.len())
}

/// Starts a frame at the end of `out` and returns where it starts; write the body, then call
/// [`finish_frame`]. Writing the body in place saves a copy per response.
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; LEN_PREFIX]);
    start
}

/// Fills in the length prefix of the frame begun at `start`.
pub fn finish_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - LEN_PREFIX) as u32;
    out[start..start + LEN_PREFIX].copy_from_slice(&len.to_be_bytes());
}

/// Appends a whole frame carrying `body` to `out`.
pub fn push_frame(out: &mut Vec<u8>, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
}
