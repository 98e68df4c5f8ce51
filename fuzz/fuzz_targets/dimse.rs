//! DIMSE command sets and message assembly from a peer's bytes: `CommandSet::decode` on the whole input, then the
//! input cut into P-DATA values (command/data, last flags and presentation contexts taken from the bytes) fed to
//! a size-capped `MessageAssembler`. Nothing may panic or allocate past the cap.
#![no_main]

use dicom_ul::pdu::{PDataValue, PDataValueType};
use libfuzzer_sys::fuzz_target;
use lungsentry::receive::dimse::{CommandSet, MessageAssembler};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = CommandSet::decode(data) {
        // What decodes must encode again.
        let _ = c.encode();
    }
    let mut asm = MessageAssembler::new(1 << 20);
    let mut rest = data;
    while rest.len() >= 3 {
        let (head, tail) = rest.split_at(3);
        let len = (head[2] as usize).min(tail.len());
        let (chunk, after) = tail.split_at(len);
        let pdv = PDataValue {
            presentation_context_id: head[0] | 1,
            value_type: if head[1] & 1 == 0 { PDataValueType::Command } else { PDataValueType::Data },
            is_last: head[1] & 2 != 0,
            data: chunk.to_vec(),
        };
        if asm.push(pdv).is_err() {
            asm = MessageAssembler::new(1 << 20);
        }
        rest = after;
    }
});
