//! A DICOM instance from a peer's bytes to HU slices, along the product's path: the input is a file meta group
//! (without preamble and without the "DICM" magic, which the target adds so no mutation is spent on it) followed
//! by the dataset. The dataset first goes through the receive-time checks (`spool::check_dataset`: lengths,
//! parse, routing attributes, Pixel Data), as only a dataset that passes them is ever spooled; then the whole
//! stream is read as the series worker reads a spooled file (the Part 10 reader) and decoded by
//! `preprocess::decode_hu_frames` (stored values, padding, rescale, codestream-size guard, the pixel codecs).
//! Errors are fine; panics, hangs and huge allocations are not.
//!
//! (Before 2026-11-27 the target handed the bytes to the Part 10 reader without the magic, which refused every
//! input in the meta group: its runs never reached the decoder.)
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = Vec::with_capacity(data.len() + 4);
    stream.extend_from_slice(b"DICM");
    stream.extend_from_slice(data);
    let mut cursor = Cursor::new(&stream[..]);
    let Ok(meta) = dicom_object::FileMetaTable::from_reader(&mut cursor) else { return };
    let dataset = &stream[cursor.position() as usize..];
    if lungsentry::spool::check_dataset(dataset, meta.transfer_syntax(), None, None).is_err() {
        return;
    }
    let Ok(obj) = dicom_object::OpenFileOptions::new().from_reader(&stream[..]) else { return };
    let _ = lungsentry::preprocess::decode_hu_frames(&obj);
});
