//! dicom — the DICOM encoding rules the receiver, the spool, the SCU, the outputs and the phantom share: transfer
//! syntax UIDs we name in code, DIMSE status codes, value-representation rules (which VR a tag has in Implicit VR,
//! the size of one value of a binary VR, which explicit VRs carry a 32-bit length, how a DS value is written) and
//! the bounds checks built on them.
//!
//! Owns: [`status`] (the codes every C-STORE-RSP / C-ECHO-RSP carries and how to read them), [`implicit_vr`],
//! [`value_unit`], [`has_long_length`], [`ds`] (a decimal string within its 16 characters), [`check_lengths`]
//! (every element length of an encoded dataset against the bytes that follow, before a parser allocates it) and
//! [`check_meta_group`] (the same for a Part-10 file's meta group).
//! Hands on: plain values and `Result<(), String>` reasons; callers map a reason to their own error (the spool to
//! a 0xC000 refusal, `scu` and `read_instance` to an error naming the file).
//! Never: imports anything else of the crate (it is a leaf every DICOM-speaking module may use), parses a
//! dataset into objects, reads files or sockets.

use dicom_core::{Tag, VR};

/// Implicit VR Little Endian, the only standard transfer syntax without explicit VRs.
pub const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Explicit VR Little Endian.
pub const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
/// Deflated Explicit VR Little Endian.
pub const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
/// Deepest sequence nesting the bounds check walks before refusing the dataset.
const MAX_NESTING: usize = 32;

/// DIMSE status codes: the ones we send, and how to read the ones a peer sends back ([`status::is_stored`]).
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Refused: out of resources (disk full, spool cannot write).
    pub const OUT_OF_RESOURCES: u16 = 0xA700;
    /// Error: data set does not match SOP class.
    pub const DATASET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
    /// Error: cannot understand (unparseable or unusable dataset). C000–CFFF range.
    pub const CANNOT_UNDERSTAND: u16 = 0xC000;
    /// Failure: SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
    /// Failure: processing failure.
    pub const PROCESSING_FAILURE: u16 = 0x0110;
    /// Failure: unrecognized operation (a DIMSE command we do not serve).
    pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
    /// Failure: no such SOP class (AffectedSOPClassUID is not the presentation context's abstract syntax).
    pub const NO_SUCH_SOP_CLASS: u16 = 0x0118;
    /// Warning: coercion of data elements (B000); the first of the warning range B000–BFFF.
    pub const WARNING_COERCION: u16 = 0xB000;

    /// Whether a C-STORE status means the instance was stored (success or any warning).
    pub fn is_stored(status: u16) -> bool {
        status == SUCCESS || status == 0x0107 || status == 0x0116 || (0xB000..=0xBFFF).contains(&status)
    }
}

/// Explicit VR: whether an element of this VR has the long header form (2 reserved bytes, then a 32-bit length)
/// instead of a 16-bit length (PS3.5 7.1.2).
pub fn has_long_length(vr: [u8; 2]) -> bool {
    matches!(&vr, b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UN" | b"UR" | b"UT" | b"UV")
}

/// Walks every element header of an encoded dataset and checks each defined length against the bytes that
/// actually follow, before the parser sees it. The parser allocates (and zero-fills) a value's declared
/// length up front, so a header claiming 4 GiB in a 1 KiB message must be refused here, not allocated there.
pub fn check_lengths(data: &[u8], explicit: bool, big_endian: bool) -> Result<(), String> {
    let mut w = Walker { data, explicit, big_endian };
    let mut pos = 0usize;
    w.elements(&mut pos, data.len(), 0, false)
}

/// Cursor state of [`check_lengths`].
struct Walker<'a> {
    /// The whole dataset.
    data: &'a [u8],
    /// Explicit VR encoding (every standard TS except Implicit VR LE).
    explicit: bool,
    /// Explicit VR Big Endian (retired, still registered).
    big_endian: bool,
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
const ITEM: (u16, u16) = (0xFFFE, 0xE000);
const ITEM_END: (u16, u16) = (0xFFFE, 0xE00D);
const SEQ_END: (u16, u16) = (0xFFFE, 0xE0DD);

impl Walker<'_> {
    fn u16_at(&self, p: usize) -> u16 {
        let b = [self.data[p], self.data[p + 1]];
        if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        }
    }

    fn u32_at(&self, p: usize) -> u32 {
        let b = [self.data[p], self.data[p + 1], self.data[p + 2], self.data[p + 3]];
        if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    }

    /// Tag at `p` (needs 4 bytes before `end`).
    fn tag(&self, p: usize, end: usize) -> Result<(u16, u16), String> {
        if end.saturating_sub(p) < 4 {
            return Err(format!("truncated element header at offset {p}"));
        }
        Ok((self.u16_at(p), self.u16_at(p + 2)))
    }

    /// A defined length that must fit in `[p, end)`.
    fn fits(&self, p: usize, len: u32, end: usize, tag: (u16, u16)) -> Result<usize, String> {
        let len = len as usize;
        if len > end - p {
            return Err(format!(
                "element ({:04X},{:04X}) at offset {p} claims {len} bytes but only {} remain",
                tag.0,
                tag.1,
                end - p
            ));
        }
        Ok(p + len)
    }

    /// Elements from `*pos` up to `end`; with `until_item_end`, stops after an Item Delimitation.
    fn elements(&mut self, pos: &mut usize, end: usize, depth: usize, until_item_end: bool) -> Result<(), String> {
        if depth > MAX_NESTING {
            return Err(format!("sequences nested deeper than {MAX_NESTING}"));
        }
        while *pos < end {
            let tag = self.tag(*pos, end)?;
            if tag == ITEM_END {
                if !until_item_end {
                    return Err(format!("unexpected item delimitation at offset {pos}"));
                }
                *pos += 8;
                return if *pos <= end { Ok(()) } else { Err("truncated item delimitation".into()) };
            }
            if tag.0 == 0xFFFE {
                return Err(format!("unexpected item tag ({:04X},{:04X}) at offset {pos}", tag.0, tag.1));
            }
            let (vr, len, header) = if self.explicit {
                if end - *pos < 8 {
                    return Err(format!("truncated element header at offset {pos}"));
                }
                let vr = [self.data[*pos + 4], self.data[*pos + 5]];
                if !vr.iter().all(u8::is_ascii_uppercase) {
                    return Err(format!("invalid VR bytes {vr:?} at offset {}", *pos + 4));
                }
                let long = has_long_length(vr);
                if long {
                    if end - *pos < 12 {
                        return Err(format!("truncated element header at offset {pos}"));
                    }
                    (Some(vr), self.u32_at(*pos + 8), 12)
                } else {
                    (Some(vr), u32::from(self.u16_at(*pos + 6)), 8)
                }
            } else {
                if end - *pos < 8 {
                    return Err(format!("truncated element header at offset {pos}"));
                }
                (None, self.u32_at(*pos + 4), 8)
            };
            *pos += header;
            let unit = value_unit(match vr {
                Some(v) => VR::from_binary(v).unwrap_or(VR::UN),
                None => implicit_vr(tag),
            });
            if len != UNDEFINED && len as usize % unit != 0 {
                return Err(format!(
                    "element ({:04X},{:04X}) at offset {} has length {len}, not a multiple of its value size {unit}",
                    tag.0,
                    tag.1,
                    *pos - header
                ));
            }
            let is_sq = match vr {
                Some(v) => &v == b"SQ" || (len == UNDEFINED && &v == b"UN"),
                None => len == UNDEFINED || dictionary_says_sequence(tag),
            };
            if tag == (0x7FE0, 0x0010) && len == UNDEFINED {
                self.fragments(pos, end, tag)?;
            } else if is_sq {
                self.sequence(pos, end, len, depth, tag)?;
            } else if len == UNDEFINED {
                return Err(format!("undefined length on non-sequence element ({:04X},{:04X})", tag.0, tag.1));
            } else {
                *pos = self.fits(*pos, len, end, tag)?;
            }
        }
        if until_item_end {
            return Err("item without delimitation".into());
        }
        Ok(())
    }

    /// Items of a sequence whose value starts at `*pos`.
    fn sequence(&mut self, pos: &mut usize, end: usize, len: u32, depth: usize, tag: (u16, u16)) -> Result<(), String> {
        let seq_end = if len == UNDEFINED { end } else { self.fits(*pos, len, end, tag)? };
        while *pos < seq_end {
            let t = self.tag(*pos, seq_end)?;
            if seq_end - *pos < 8 {
                return Err(format!("truncated item header at offset {pos}"));
            }
            let item_len = self.u32_at(*pos + 4);
            *pos += 8;
            if t == SEQ_END {
                if len != UNDEFINED {
                    return Err("sequence delimitation in a defined-length sequence".into());
                }
                return Ok(());
            }
            if t != ITEM {
                return Err(format!(
                    "expected an item in sequence ({:04X},{:04X}), found ({:04X},{:04X})",
                    tag.0, tag.1, t.0, t.1
                ));
            }
            if item_len == UNDEFINED {
                self.elements(pos, seq_end, depth + 1, true)?;
            } else {
                let item_end = self.fits(*pos, item_len, seq_end, t)?;
                self.elements(pos, item_end, depth + 1, false)?;
            }
        }
        if len == UNDEFINED {
            return Err(format!("sequence ({:04X},{:04X}) without delimitation", tag.0, tag.1));
        }
        Ok(())
    }

    /// Encapsulated Pixel Data: items of raw bytes, ended by a Sequence Delimitation.
    fn fragments(&mut self, pos: &mut usize, end: usize, tag: (u16, u16)) -> Result<(), String> {
        loop {
            let t = self.tag(*pos, end)?;
            if end - *pos < 8 {
                return Err(format!("truncated fragment header at offset {pos}"));
            }
            let len = self.u32_at(*pos + 4);
            *pos += 8;
            if t == SEQ_END {
                return Ok(());
            }
            if t != ITEM || len == UNDEFINED {
                return Err(format!("malformed pixel data fragment in ({:04X},{:04X}) at offset {pos}", tag.0, tag.1));
            }
            *pos = self.fits(*pos, len, end, t)?;
        }
    }
}

/// Implicit VR: whether the standard dictionary types `tag` as a sequence (the parser decides the same way).
fn dictionary_says_sequence(tag: (u16, u16)) -> bool {
    implicit_vr(tag) == VR::SQ
}

/// Implicit VR: the VR the parser reads `tag` as — the standard dictionary's, with context-dependent VRs
/// relaxed the way dicom-rs relaxes them (US/SS → US, OB/OW → OW), and UN for tags it does not know.
pub fn implicit_vr(tag: (u16, u16)) -> VR {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    dicom_dictionary_std::StandardDataDictionary.by_tag(Tag(tag.0, tag.1)).map(|e| e.vr().relaxed()).unwrap_or(VR::UN)
}

/// Size of one value of a binary VR (1 for strings and bytes). The parser reads `length / unit` values but
/// advances its offset by `length`, so a length that is not a multiple of the unit leaves it reading headers
/// out of step with the bytes — where it later found a "4 GiB" length inside a 124-byte command set (fuzz
/// finding, corpus case `dimse/command-ul-odd-length`). Every such length is refused before parsing.
pub fn value_unit(vr: VR) -> usize {
    match vr {
        VR::US | VR::SS | VR::OW => 2,
        VR::UL | VR::SL | VR::FL | VR::OF | VR::OL | VR::AT => 4,
        VR::FD | VR::OD | VR::SV | VR::UV | VR::OV => 8,
        _ => 1,
    }
}

/// Formats a decimal string (DS) value within its 16 characters: the most decimals (up to 6) that fit, trailing
/// zeros and a `-0` dropped. The phantom's slices and the DICOM outputs (SEG, SR) write every DS through it.
pub fn ds(v: f64) -> String {
    for prec in (0..=6).rev() {
        let s = format!("{:.*}", prec, v);
        let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
        let s = if s == "-0" { "0".to_string() } else { s };
        if s.len() <= 16 {
            return s;
        }
    }
    format!("{:.0}", v)
}

/// Checks the file meta group at the start of a Part 10 file (`head`: its first bytes, with or without the
/// 128-byte preamble; `file_len`: the whole file's length): every element header and value of group 0002
/// (explicit VR little endian) lies inside the file. dicom-rs allocates a meta element's declared length before
/// reading it, so a few-KB file claiming a 2 GB meta element (found by fuzzing) must be refused here.
pub fn check_meta_group(head: &[u8], file_len: u64) -> Result<(), String> {
    let start = if head.len() >= 132 && &head[128..132] == b"DICM" {
        132
    } else if head.len() >= 4 && &head[0..4] == b"DICM" {
        4
    } else {
        return Err("not a DICOM Part 10 file (no DICM marker)".into());
    };
    let mut pos = start as u64;
    loop {
        let p = pos as usize;
        if p + 8 > head.len() {
            // The group ends at the end of what we read (or of the file): nothing left to misread.
            return Ok(());
        }
        let group = u16::from_le_bytes([head[p], head[p + 1]]);
        if group != 0x0002 {
            return Ok(());
        }
        let vr = [head[p + 4], head[p + 5]];
        let long = has_long_length(vr);
        let (header, len) = if long {
            if p + 12 > head.len() {
                return Err("file meta group cut short".into());
            }
            (12u64, u32::from_le_bytes([head[p + 8], head[p + 9], head[p + 10], head[p + 11]]) as u64)
        } else {
            (8u64, u16::from_le_bytes([head[p + 6], head[p + 7]]) as u64)
        };
        let tag = (group, u16::from_le_bytes([head[p + 2], head[p + 3]]));
        if len == 0xFFFF_FFFF {
            return Err(format!("file meta element ({:04X},{:04X}) has an undefined length", tag.0, tag.1));
        }
        let end = pos + header + len;
        if end > file_len {
            return Err(format!(
                "file meta element ({:04X},{:04X}) claims {len} bytes past the end of the {file_len}-byte file",
                tag.0, tag.1
            ));
        }
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ds_values_fit_sixteen_characters() {
        assert_eq!(ds(0.5), "0.5");
        assert_eq!(ds(2.0), "2");
        assert_eq!(ds(-0.0000001), "0");
        assert_eq!(ds(-123.4567891), "-123.456789");
        assert_eq!(ds(123_456_789.123_456_79), "123456789.123457");
        assert!(ds(1e20).len() > 16, "no DS fits; the integer is written whole");
    }

    #[test]
    fn long_header_vrs_and_stored_statuses() {
        for vr in [b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV", b"SV", b"UV"] {
            assert!(has_long_length(*vr), "{}", String::from_utf8_lossy(vr));
        }
        for vr in [b"US", b"UL", b"LO", b"UI", b"FD", b"AT", b"DS", b"PN"] {
            assert!(!has_long_length(*vr), "{}", String::from_utf8_lossy(vr));
        }
        assert!(status::is_stored(status::SUCCESS) && status::is_stored(status::WARNING_COERCION));
        assert!(status::is_stored(0x0107) && status::is_stored(0xBFFF));
        assert!(!status::is_stored(status::OUT_OF_RESOURCES) && !status::is_stored(status::CANNOT_UNDERSTAND));
    }

    #[test]
    fn meta_elements_must_lie_inside_the_file() {
        // DICM, (0002,0000) UL 4 = 26, (0002,0010) UI 18 "1.2.840.10008.1.2\0".
        let mut f = b"DICM".to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, b'U', b'L', 4, 0, 26, 0, 0, 0]);
        f.extend_from_slice(&[2, 0, 0x10, 0, b'U', b'I', 18, 0]);
        f.extend_from_slice(b"1.2.840.10008.1.2\0");
        f.extend_from_slice(&[8, 0, 0x16, 0, b'U', b'I', 2, 0, b'1', 0]);
        assert_eq!(check_meta_group(&f, f.len() as u64), Ok(()));
        let mut pre = vec![0u8; 128];
        pre.extend_from_slice(&f);
        assert_eq!(check_meta_group(&pre, pre.len() as u64), Ok(()));
        // The fuzzer's case: a string element claiming ~2 GB in a small file.
        let mut bad = f.clone();
        bad[22..24].copy_from_slice(&0xFFF0u16.to_le_bytes());
        assert!(check_meta_group(&bad, bad.len() as u64).unwrap_err().contains("past the end"));
        let mut ob = b"DICM".to_vec();
        ob.extend_from_slice(&[2, 0, 1, 0, b'O', b'B', 0, 0, 0, 0, 0, 0x80]);
        assert!(check_meta_group(&ob, ob.len() as u64).is_err());
        assert!(check_meta_group(b"not dicom", 9).is_err());
    }

    #[test]
    fn binary_lengths_must_be_whole_values() {
        // Implicit VR LE: (0008,0000) is UL in the dictionary; 5 bytes is not a whole number of values.
        let implicit_ul5 = [0x08, 0, 0, 0, 5, 0, 0, 0, 1, 2, 3, 4, 5];
        let err = check_lengths(&implicit_ul5, false, false).unwrap_err();
        assert!(err.contains("not a multiple of its value size 4"), "{err}");
        // Explicit VR LE: FD with 12 bytes, US with 3.
        let explicit_fd12 = [&[0x18, 0, 0x50, 0, b'F', b'D', 12, 0][..], &[0u8; 12]].concat();
        assert!(check_lengths(&explicit_fd12, true, false).unwrap_err().contains("size 8"));
        let explicit_us3 = [0x28, 0, 0x10, 0, b'U', b'S', 3, 0, 0, 2, 0];
        assert!(check_lengths(&explicit_us3, true, false).is_err());
        // Whole values pass; strings may have any length (odd lengths exist in the wild).
        let explicit_us2 = [0x28, 0, 0x10, 0, b'U', b'S', 2, 0, 0, 2];
        check_lengths(&explicit_us2, true, false).unwrap();
        let explicit_lo3 = [0x08, 0, 0x30, 0x10, b'L', b'O', 3, 0, b'a', b'b', b'c'];
        check_lengths(&explicit_lo3, true, false).unwrap();
        let implicit_ul4 = [0x08, 0, 0, 0, 4, 0, 0, 0, 1, 2, 3, 4];
        check_lengths(&implicit_ul4, false, false).unwrap();
    }
}
