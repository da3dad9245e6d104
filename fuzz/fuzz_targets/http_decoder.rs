//! Feeds a request stream to `RequestDecoder` in pieces and checks it finds
//! exactly what `parse_request` finds in one read. Input: one byte choosing
//! the limits and the piece count `k`, then `k` piece lengths, then the stream.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringcast::protocol::http::{parse_request, HttpError, HttpLimits, Request, RequestDecoder};
use ringcast::protocol::Decoded;

/// Limits small enough that the fuzzer reaches every bound.
const SMALL: HttpLimits = HttpLimits {
    max_header_bytes: 256,
    max_headers: 8,
    max_body_bytes: 128,
};

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let limits = if control & 0x80 != 0 {
        SMALL
    } else {
        HttpLimits::default()
    };
    let (lens, stream) = rest.split_at(usize::from(control & 0x0f).min(rest.len()));
    assert_eq!(in_pieces(stream, lens, limits), at_once(stream, limits));
});

/// What a connection decodes: pieces of `1 + len` bytes (cycling), keeping
/// what was not consumed, calling again after each complete request.
fn in_pieces(stream: &[u8], lens: &[u8], limits: HttpLimits) -> (Vec<Request>, Option<HttpError>) {
    let (mut decoder, mut held, mut requests) =
        (RequestDecoder::new(limits), Vec::new(), Vec::new());
    let mut sizes = lens.iter().map(|&len| 1 + usize::from(len)).cycle();
    let mut from = 0;
    while from < stream.len() {
        let to = sizes
            .next()
            .map_or(stream.len(), |size| (from + size).min(stream.len()));
        held.extend_from_slice(&stream[from..to]);
        from = to;
        loop {
            match decoder.decode(&held) {
                Ok((used, request)) => {
                    assert!(used <= held.len());
                    held.drain(..used);
                    match request {
                        Some(request) => requests.push(request),
                        None => break,
                    }
                }
                Err(e) => return (requests, Some(e)),
            }
        }
    }
    (requests, None)
}

/// What `parse_request` finds reading all of `stream` at once.
fn at_once(mut stream: &[u8], limits: HttpLimits) -> (Vec<Request>, Option<HttpError>) {
    let mut requests = Vec::new();
    loop {
        match parse_request(stream, &limits) {
            Ok(Decoded::Complete(request, used)) => {
                requests.push(request);
                stream = &stream[used..];
            }
            Ok(Decoded::Partial) => return (requests, None),
            Err(e) => return (requests, Some(e)),
        }
    }
}
