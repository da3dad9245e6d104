//! permessage-deflate on a shard: how many of its WebSockets negotiated it
//! (a fan-out looks at subscribers' formats only when one has), the
//! compressor every publication goes through at most once, and the
//! decompressor of client messages (one for all: each client was asked not
//! to take its context over, see `protocol::deflate`).

use crate::protocol::deflate::{Agreed, Deflater, Inflater};

pub(crate) struct Compression {
    /// Open WebSockets that negotiated it.
    pub(crate) websockets: usize,
    /// Pushes shorter than this go uncompressed: the frame would not
    /// shrink enough to pay for the work.
    pub(crate) min_bytes: usize,
    pub(crate) deflater: Deflater,
    pub(crate) inflater: Inflater,
}

impl Compression {
    pub(crate) fn new(min_bytes: usize) -> Compression {
        Compression {
            websockets: 0,
            min_bytes,
            deflater: Deflater::default(),
            inflater: Inflater::new(Agreed {
                client_no_context_takeover: true,
            }),
        }
    }
}
