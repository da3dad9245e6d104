#![no_main]
use libfuzzer_sys::fuzz_target;
use ringcast::protocol::{
    frame::{FrameDecoder, FrameLimits},
    Decoded,
};

fuzz_target!(|data: &[u8]| {
    let (mut decoder, mut input) = (FrameDecoder::new(FrameLimits::default()), data);
    while let Ok(Decoded::Complete(_, used)) = decoder.decode(input) {
        input = &input[used..];
    }
});
