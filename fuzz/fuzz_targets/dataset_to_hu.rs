//! A dataset from a peer's bytes to HU slices, along the product's path. A peer sends only a dataset, in the
//! transfer syntax of its presentation context: the input's first byte picks that transfer syntax from
//! [`TRANSFER_SYNTAXES`], the rest is the dataset. It first goes through the receive-time checks
//! (`spool::check_dataset`: lengths, parse, routing attributes, Pixel Data) — only a dataset that passes them is
//! ever spooled —, then our own file meta group is put in front of it (`spool::part10_header`, as the spool writes
//! it), the whole file is read as a series worker reads a spooled one (the Part 10 reader), and
//! `decode::decode_hu_frames` decodes it (stored values, padding, rescale, codestream-size guard, the pixel
//! codecs). Errors are fine; panics, hangs and huge allocations are not.
//!
//! History (docs/RELIABILITY.md): until 2026-11-27 the input was a meta group + dataset handed straight to the
//! Part 10 reader, without the "DICM" magic, so every run stopped in the meta group and never reached the
//! decoder; with the magic added, the fuzzer found dicom-rs allocating a meta element's declared length (2 GB) —
//! in a meta group no peer can send us.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The transfer syntaxes a presentation context may carry for a CT image (deflate is inflated before the checks,
/// so it is left out here).
const TRANSFER_SYNTAXES: [&str; 9] = [
    "1.2.840.10008.1.2",      // Implicit VR Little Endian
    "1.2.840.10008.1.2.1",    // Explicit VR Little Endian
    "1.2.840.10008.1.2.2",    // Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50", // JPEG Baseline
    "1.2.840.10008.1.2.4.70", // JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.80", // JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90", // JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91", // JPEG 2000
    "1.2.840.10008.1.2.5",    // RLE Lossless
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, dataset)) = data.split_first() else { return };
    let ts = TRANSFER_SYNTAXES[pick as usize % TRANSFER_SYNTAXES.len()];
    let Ok(meta) = lungsentry::spool::check_dataset(dataset, ts, None) else { return };
    let Ok(mut file) = lungsentry::spool::part10_header(&meta, ts) else { return };
    file.extend_from_slice(dataset);
    let Ok(obj) = dicom_object::OpenFileOptions::new().from_reader(&file[..]) else { return };
    let _ = lungsentry::decode::decode_hu_frames(&obj);
});
