//! A DICOM file from a peer's bytes to HU slices: the Part 10 reader, then `preprocess::decode_hu_frames`
//! (stored-value interpretation, padding, rescale, codestream-size guard, the pixel codecs behind
//! dicom-pixeldata). Errors are fine; panics, hangs and huge allocations are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(obj) = dicom_object::OpenFileOptions::new().from_reader(data) else { return };
    let _ = lungsentry::preprocess::decode_hu_frames(&obj);
});
