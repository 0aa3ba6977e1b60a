//! HELLO: the first request on every connection; agrees the protocol version.

use scaled_client::answers::Welcome;
use scaled_client::proto::{
    Args, ErrorCode, MAX_FRAME_LEN, MAX_KEY_LEN, MAX_VALUE_LEN, PROTOCOL_VERSION,
};

use super::{CommandError, CommandResult, Peer, Reply};

pub fn run(peer: &mut Peer, args: Args) -> CommandResult {
    let version = args
        .version
        .ok_or_else(|| CommandError::new(ErrorCode::BadArgument, "missing argument `version`"))?;
    if version != PROTOCOL_VERSION {
        return Err(CommandError::new(
            ErrorCode::UnsupportedVersion,
            format!("this daemon speaks protocol version {PROTOCOL_VERSION}, not {version}"),
        ));
    }
    let name = args.client.unwrap_or_default();
    tracing::debug!(conn = peer.conn_id, client = %name, "hello");
    peer.owner = std::sync::Arc::from(format!("{name}#{}", peer.conn_id));
    peer.greeted = true;
    Reply::encode(&Welcome {
        version: PROTOCOL_VERSION,
        server: concat!("scaled ", env!("CARGO_PKG_VERSION")).to_string(),
        max_frame: MAX_FRAME_LEN as u64,
        max_key: MAX_KEY_LEN as u64,
        max_value: MAX_VALUE_LEN as u64,
    })
}
