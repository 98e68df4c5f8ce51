//! The corpus's raw material: the phantom slice and its DCMTK re-encodings ([`Bases`]), encoding an object in a
//! transfer syntax, and the byte-level surgery the dataset cases make (find an element, set its length, swap its
//! VR, insert raw bytes, fragment items, seeded noise).

use std::path::Path;

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use super::*;

/// The phantom slice every dataset case starts from, plus its DCMTK re-encodings.
pub struct Bases {
    /// The phantom slice as an object (Explicit VR LE file).
    pub object: InMemDicomObject,
    /// SOP Instance UID root: each case's instance is `<root>.<n>`.
    pub uid_root: String,
    /// RLE Lossless dataset bytes (dcmcrle) of the same slice, with its SOP Instance UID.
    pub rle: (String, Vec<u8>),
    /// JPEG Lossless SV1 dataset bytes (dcmcjpeg) of the same slice, with its SOP Instance UID.
    pub jpeg: (String, Vec<u8>),
    /// Deflated Explicit VR LE dataset bytes (dcmconv +td), with its SOP Instance UID.
    pub deflated: (String, Vec<u8>),
}

/// Dataset bytes of a Part-10 file (after the file meta group) and its transfer syntax.
pub fn dataset_of_file(path: &Path) -> (String, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[128..132], b"DICM", "{} is not Part-10", path.display());
    let gl = u32::from_le_bytes(bytes[140..144].try_into().unwrap()) as usize;
    let start = 144 + gl;
    let obj = dicom_object::open_file(path).unwrap();
    (obj.meta().transfer_syntax().trim_end_matches('\0').to_string(), bytes[start..].to_vec())
}

pub(super) fn with_uid(obj: &InMemDicomObject, sop: &str) -> InMemDicomObject {
    let mut o = obj.clone();
    o.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)));
    o
}

pub fn encode(obj: &InMemDicomObject, ts_uid: &str) -> Vec<u8> {
    let ts = TransferSyntaxRegistry.get(ts_uid).unwrap();
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts).unwrap();
    out
}

/// Writes a copy of `src` with SOP Instance UID `sop` re-encoded by a DCMTK tool, returns its dataset bytes.
pub(super) fn dcmtk_reencode(src: &Path, sop: &str, tool: &str, args: &[&str], work: &Path) -> (String, Vec<u8>) {
    let mut obj = dicom_object::open_file(src).unwrap();
    obj.put(DataElement::new(tags::SOP_INSTANCE_UID, VR::UI, PrimitiveValue::from(sop)));
    obj.update_meta(|m| m.media_storage_sop_instance_uid = sop.to_string());
    let input = work.join(format!("{tool}-in.dcm"));
    let output = work.join(format!("{tool}-out.dcm"));
    obj.write_to_file(&input).unwrap();
    let st = std::process::Command::new(tool).args(args).arg(&input).arg(&output).status().expect(tool);
    assert!(st.success(), "{tool} failed");
    let (ts, data) = dataset_of_file(&output);
    (ts, data)
}

impl Bases {
    /// From phantom slice `slice` (a Part-10 Explicit VR LE file); DCMTK files are written under `work`.
    pub fn new(slice: &Path, work: &Path) -> Bases {
        let file = dicom_object::open_file(slice).unwrap();
        let uid_root = file.meta().media_storage_sop_instance_uid().trim_end_matches('\0').to_string();
        let object = file.into_inner();
        let rle_uid = format!("{uid_root}.9100");
        let jpeg_uid = format!("{uid_root}.9200");
        let defl_uid = format!("{uid_root}.9300");
        let rle = dcmtk_reencode(slice, &rle_uid, "dcmcrle", &[], work);
        assert_eq!(rle.0, RLE);
        let jpeg = dcmtk_reencode(slice, &jpeg_uid, "dcmcjpeg", &["+e1"], work);
        assert_eq!(jpeg.0, JPEG_SV1);
        let deflated = dcmtk_reencode(slice, &defl_uid, "dcmconv", &["+td"], work);
        assert_eq!(deflated.0, DEFLATED);
        Bases { object, uid_root, rle: (rle_uid, rle.1), jpeg: (jpeg_uid, jpeg.1), deflated: (defl_uid, deflated.1) }
    }

    pub(super) fn sop(&self, n: u32) -> String {
        format!("{}.{n}", self.uid_root)
    }
}

/// Where one top-level element sits in an Explicit VR LE dataset.
#[derive(Debug, Clone, Copy)]
pub struct Located {
    /// Offset of the tag.
    pub header: usize,
    /// Offset of the value.
    pub value: usize,
    /// Declared value length.
    pub len: u32,
    /// Whether the length field is 4 bytes (OB/OW/SQ/UT/UN…) at header+8, else 2 bytes at header+6.
    pub long: bool,
}

/// Finds top-level `tag` in a flat Explicit VR LE dataset with defined lengths.
pub fn locate(data: &[u8], tag: Tag) -> Located {
    let mut p = 0;
    while p + 8 <= data.len() {
        let g = u16::from_le_bytes([data[p], data[p + 1]]);
        let e = u16::from_le_bytes([data[p + 2], data[p + 3]]);
        let vr = &data[p + 4..p + 6];
        let long = matches!(vr, b"OB" | b"OW" | b"OF" | b"OD" | b"OL" | b"SQ" | b"UT" | b"UN" | b"UC" | b"UR");
        let (len, value) = if long {
            (u32::from_le_bytes(data[p + 8..p + 12].try_into().unwrap()), p + 12)
        } else {
            (u16::from_le_bytes([data[p + 6], data[p + 7]]) as u32, p + 8)
        };
        if Tag(g, e) == tag {
            return Located { header: p, value, len, long };
        }
        p = value + len as usize;
    }
    panic!("tag {tag} not found");
}

/// Sets the declared length of the element at `at` without changing the bytes that follow.
pub(super) fn set_len(data: &mut [u8], at: Located, len: u32) {
    if at.long {
        data[at.header + 8..at.header + 12].copy_from_slice(&len.to_le_bytes());
    } else {
        data[at.header + 6..at.header + 8].copy_from_slice(&(len as u16).to_le_bytes());
    }
}

/// Offset of `tag` in an Implicit VR LE flat dataset.
pub(super) fn locate_implicit(data: &[u8], tag: Tag) -> usize {
    let mut p = 0;
    while p + 8 <= data.len() {
        let g = u16::from_le_bytes([data[p], data[p + 1]]);
        let e = u16::from_le_bytes([data[p + 2], data[p + 3]]);
        if Tag(g, e) == tag {
            return p;
        }
        p += 8 + u32::from_le_bytes(data[p + 4..p + 8].try_into().unwrap()) as usize;
    }
    panic!("tag {tag} not found");
}

/// Re-encodes the element `tag` with a different VR (raw bytes of `value`) in an Explicit VR LE dataset.
pub(super) fn replace_with_vr(data: &[u8], tag: Tag, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
    let at = locate(data, tag);
    let mut out = data[..at.header].to_vec();
    out.extend_from_slice(&tag.0.to_le_bytes());
    out.extend_from_slice(&tag.1.to_le_bytes());
    out.extend_from_slice(vr);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(&data[at.value + at.len as usize..]);
    out
}

/// Inserts raw element bytes before the first element whose tag is greater than `tag` (ascending order kept).
pub(super) fn insert_raw(data: &[u8], tag: Tag, raw: &[u8]) -> Vec<u8> {
    let mut p = 0;
    while p + 8 <= data.len() {
        let g = u16::from_le_bytes([data[p], data[p + 1]]);
        let e = u16::from_le_bytes([data[p + 2], data[p + 3]]);
        if Tag(g, e) > tag {
            break;
        }
        let vr = &data[p + 4..p + 6];
        let long = matches!(vr, b"OB" | b"OW" | b"OF" | b"OD" | b"OL" | b"SQ" | b"UT" | b"UN" | b"UC" | b"UR");
        p = if long {
            p + 12 + u32::from_le_bytes(data[p + 8..p + 12].try_into().unwrap()) as usize
        } else {
            p + 8 + u16::from_le_bytes([data[p + 6], data[p + 7]]) as usize
        };
    }
    let mut out = data[..p].to_vec();
    out.extend_from_slice(raw);
    out.extend_from_slice(&data[p..]);
    out
}

/// Explicit VR LE element header for a long-form VR.
pub(super) fn long_header(tag: Tag, vr: &[u8; 2], len: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&tag.0.to_le_bytes());
    v.extend_from_slice(&tag.1.to_le_bytes());
    v.extend_from_slice(vr);
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&len.to_le_bytes());
    v
}

pub(super) fn item(len: u32) -> Vec<u8> {
    let mut v = vec![0xFE, 0xFF, 0x00, 0xE0];
    v.extend_from_slice(&len.to_le_bytes());
    v
}

pub(super) const ITEM_DELIM: [u8; 8] = [0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0];
pub(super) const SEQ_DELIM: [u8; 8] = [0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0];

/// A small deterministic generator for "random bytes" cases.
pub(super) fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Encapsulated Pixel Data: offset of the first fragment item after the Basic Offset Table, in an Explicit
/// VR LE dataset whose Pixel Data has undefined length.
pub(super) fn first_fragment(data: &[u8]) -> usize {
    let pd = locate_pixel_undefined(data);
    let bot_len = u32::from_le_bytes(data[pd + 16..pd + 20].try_into().unwrap()) as usize;
    pd + 12 + 8 + bot_len
}

/// Offset of the (7FE0,0010) header of undefined length.
pub(super) fn locate_pixel_undefined(data: &[u8]) -> usize {
    let needle = [0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
    data.windows(12).rposition(|w| w == needle).expect("encapsulated PixelData")
}
