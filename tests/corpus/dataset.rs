//! `dataset/…` cases: a C-STORE on an accepted context whose dataset bytes are broken (truncated, lying lengths,
//! wrong VRs, huge images, PixelData length mismatches, non-DICOM bytes), hostile or blank UIDs, and encapsulated
//! pixel data cut short → the C-STORE-RSP status.

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;

use super::builders::*;
use super::*;

pub(super) fn dataset_cases(b: &Bases) -> Vec<Case> {
    let mut n = 0u32;
    let mut next = || {
        n += 1;
        b.sop(n)
    };
    let mut cases = Vec::new();
    let explicit = |sop: &str| encode(&with_uid(&b.object, sop), EXPLICIT);
    let modified = |sop: &str, f: &dyn Fn(&mut InMemDicomObject)| {
        let mut o = with_uid(&b.object, sop);
        f(&mut o);
        encode(&o, EXPLICIT)
    };

    // Controls: the unmodified slice in both uncompressed syntaxes is stored.
    let s = next();
    cases.push(store_case("valid-explicit", EXPLICIT, &s, explicit(&s), SUCCESS));
    let s = next();
    cases.push(store_case("valid-implicit", IMPLICIT, &s, encode(&with_uid(&b.object, &s), IMPLICIT), SUCCESS));

    // Truncations.
    let s = next();
    cases.push(store_case("empty", EXPLICIT, &s, Vec::new(), CANNOT_UNDERSTAND));
    for (label, cut) in [("4-bytes", 4usize), ("mid-first-header", 6), ("mid-first-value", 12)] {
        let s = next();
        let d = explicit(&s);
        cases.push(store_case(&format!("truncated-{label}"), EXPLICIT, &s, d[..cut].to_vec(), CANNOT_UNDERSTAND));
    }
    let s = next();
    let d = explicit(&s);
    let px = locate(&d, tags::PIXEL_DATA);
    cases.push(store_case(
        "truncated-in-pixeldata-header",
        EXPLICIT,
        &s,
        d[..px.header + 7].to_vec(),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    let d = explicit(&s);
    cases.push(store_case("truncated-half-pixeldata", EXPLICIT, &s, d[..px.value + 4000].to_vec(), CANNOT_UNDERSTAND));
    let s = next();
    let d = explicit(&s);
    cases.push(store_case("truncated-last-byte", EXPLICIT, &s, d[..d.len() - 1].to_vec(), CANNOT_UNDERSTAND));
    let s = next();
    let d = encode(&with_uid(&b.object, &s), IMPLICIT);
    cases.push(store_case(
        "truncated-implicit-pixeldata",
        IMPLICIT,
        &s,
        d[..d.len() - 100].to_vec(),
        CANNOT_UNDERSTAND,
    ));

    // Lying lengths.
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::STUDY_DESCRIPTION);
    set_len(&mut d, at, 0xFFFE);
    cases.push(store_case("length-string-overrun", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::PIXEL_DATA);
    set_len(&mut d, at, 0xFFFF_FFF0);
    cases.push(store_case("length-pixeldata-4gib", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = encode(&with_uid(&b.object, &s), IMPLICIT);
    let at = locate_implicit(&d, tags::PIXEL_DATA);
    d[at + 4..at + 8].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    cases.push(store_case("length-implicit-pixeldata-4gib", IMPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = encode(&with_uid(&b.object, &s), IMPLICIT);
    let at = locate_implicit(&d, tags::STUDY_DESCRIPTION);
    d[at + 4..at + 8].copy_from_slice(&0x7FFF_0000u32.to_le_bytes());
    cases.push(store_case("length-implicit-string-2gib", IMPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = insert_raw(&explicit(&s), tags::STUDY_DESCRIPTION, &{
        let mut v = long_header(Tag(0x0008, 0x1030), b"UT", 0xFFFF_FFFF);
        v.extend_from_slice(b"text");
        v
    });
    // (0008,1030) now appears twice; the inserted one has an undefined length, which UT may not have.
    cases.push(store_case("length-undefined-on-text", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::ROWS);
    set_len(&mut d, at, 3);
    cases.push(store_case("length-odd-rows", EXPLICIT, &s, d, CANNOT_UNDERSTAND));

    // Wrong VRs.
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::STUDY_DESCRIPTION);
    d[at.header + 4..at.header + 6].copy_from_slice(b"zz");
    cases.push(store_case("vr-lowercase-bytes", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::STUDY_DESCRIPTION);
    d[at.header + 4..at.header + 6].copy_from_slice(&[0x01, 0x02]);
    cases.push(store_case("vr-binary-bytes", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::PIXEL_DATA);
    d[at.header + 4..at.header + 6].copy_from_slice(b"SQ");
    cases.push(store_case("vr-pixeldata-as-sequence", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = replace_with_vr(&explicit(&s), tags::ROWS, b"LO", b"abc ");
    cases.push(store_case("vr-rows-as-text", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = replace_with_vr(&explicit(&s), tags::ROWS, b"IS", b"64");
    // A readable value under the wrong VR: the pixel codecs insist on US, so it is refused up front rather
    // than acknowledged and never analysable.
    cases.push(store_case("vr-rows-as-integer-string", EXPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = explicit(&s);
    // Explicit bytes on an Implicit VR context: the first length read is "CS"+len → far past the end.
    cases.push(store_case("explicit-bytes-on-implicit-context", IMPLICIT, &s, d, CANNOT_UNDERSTAND));
    let s = next();
    let d = encode(&with_uid(&b.object, &s), IMPLICIT);
    cases.push(store_case("implicit-bytes-on-explicit-context", EXPLICIT, &s, d, CANNOT_UNDERSTAND));

    // Images claiming gigabytes (never allocated: refused from the header arithmetic).
    let big = |o: &mut InMemDicomObject| {
        o.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(65_535u16)));
        o.put(DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(65_535u16)));
    };
    let s = next();
    cases.push(store_case("rows-columns-65535", EXPLICIT, &s, modified(&s, &big), CANNOT_UNDERSTAND));
    let s = next();
    cases.push(store_case(
        "frames-2147483647",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, "2147483647"));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "rows-columns-frames-overflow",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            big(o);
            o.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(64u16)));
            o.put(DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, "999999999999"));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "rows-zero",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(0u16)));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "bits-allocated-zero",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(0u16)));
        }),
        CANNOT_UNDERSTAND,
    ));

    // PixelData length mismatches.
    let pixels = |o: &InMemDicomObject| o.element(tags::PIXEL_DATA).unwrap().to_bytes().unwrap().to_vec();
    let s = next();
    cases.push(store_case(
        "pixeldata-short-by-two",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            let p = pixels(o);
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(p[..p.len() - 2].to_vec())));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "pixeldata-1000-bytes",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(vec![0u8; 1000])));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "pixeldata-empty",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::Empty));
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "pixeldata-missing",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.remove_element(tags::PIXEL_DATA);
        }),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case(
        "pixeldata-longer-than-image",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            let mut p = pixels(o);
            p.extend_from_slice(&[0u8; 1000]);
            o.put(DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::from(p)));
        }),
        SUCCESS,
    ));
    let s = next();
    let mut d = explicit(&s);
    let at = locate(&d, tags::PIXEL_DATA);
    d.truncate(at.header);
    d.extend_from_slice(&long_header(tags::PIXEL_DATA, b"OB", 0xFFFF_FFFF));
    d.extend_from_slice(&item(0));
    d.extend_from_slice(&item(4));
    d.extend_from_slice(&[1, 2, 3, 4]);
    d.extend_from_slice(&SEQ_DELIM);
    cases.push(store_case("pixeldata-encapsulated-in-native-syntax", EXPLICIT, &s, d, CANNOT_UNDERSTAND));

    // Identity problems.
    let s = next();
    cases.push(store_case("sop-instance-differs-from-command", EXPLICIT, &s, explicit(&format!("{s}.99")), MISMATCH));
    let s = next();
    cases.push(store_case(
        "sop-class-differs-from-command",
        EXPLICIT,
        &s,
        modified(&s, &|o| {
            o.put(DataElement::new(tags::SOP_CLASS_UID, VR::UI, uids::MR_IMAGE_STORAGE));
        }),
        MISMATCH,
    ));

    // Sequences.
    let s = next();
    let mut nested = Vec::new();
    for _ in 0..100 {
        nested.extend_from_slice(&long_header(Tag(0x0008, 0x1140), b"SQ", 0xFFFF_FFFF));
        nested.extend_from_slice(&item(0xFFFF_FFFF));
    }
    for _ in 0..100 {
        nested.extend_from_slice(&ITEM_DELIM);
        nested.extend_from_slice(&SEQ_DELIM);
    }
    cases.push(store_case(
        "sequence-nested-100-deep",
        EXPLICIT,
        &s,
        insert_raw(&explicit(&s), Tag(0x0008, 0x1140), &nested),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    let mut sq = long_header(Tag(0x0008, 0x1140), b"SQ", 16);
    sq.extend_from_slice(&item(1000));
    sq.extend_from_slice(&[0u8; 8]);
    cases.push(store_case(
        "sequence-item-overrun",
        EXPLICIT,
        &s,
        insert_raw(&explicit(&s), Tag(0x0008, 0x1140), &sq),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    let mut d = explicit(&s);
    d.extend_from_slice(&long_header(Tag(0x7FE1, 0x1010), b"SQ", 0xFFFF_FFFF));
    d.extend_from_slice(&item(0xFFFF_FFFF));
    cases.push(store_case("sequence-without-delimitation", EXPLICIT, &s, d, CANNOT_UNDERSTAND));

    // Not DICOM at all.
    let s = next();
    cases.push(store_case("non-dicom-noise", EXPLICIT, &s, noise(7, 4096), CANNOT_UNDERSTAND));
    let s = next();
    cases.push(store_case("non-dicom-noise-implicit", IMPLICIT, &s, noise(8, 4096), CANNOT_UNDERSTAND));
    let s = next();
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
    png.extend_from_slice(&noise(9, 500));
    cases.push(store_case("non-dicom-png", EXPLICIT, &s, png, CANNOT_UNDERSTAND));
    let s = next();
    cases.push(store_case(
        "non-dicom-text",
        IMPLICIT,
        &s,
        b"GET / HTTP/1.1\r\nHost: lungsentry\r\n\r\n".to_vec(),
        CANNOT_UNDERSTAND,
    ));
    let s = next();
    cases.push(store_case("non-dicom-zeros", IMPLICIT, &s, vec![0u8; 4096], CANNOT_UNDERSTAND));
    let s = next();
    let mut part10 = vec![0u8; 128];
    part10.extend_from_slice(b"DICM");
    part10.extend_from_slice(&explicit(&s));
    cases.push(store_case("part10-file-sent-as-dataset", EXPLICIT, &s, part10, CANNOT_UNDERSTAND));
    cases
}

/// Study/Series/SOP Instance UIDs that break the UI VR, each on its own: the values a hostile peer would use to
/// steer a path (`..`, `.`, `../x`, `a/b`), an empty component, 65 characters, non-digits. Each is refused with
/// C000 and nothing is stored. Blank Study, Series or SOP Instance UIDs in the dataset (Type 1 attributes) are
/// refused with C000 too, nothing stored and no UID derived for them (`instance::InstanceMeta::from_received`):
/// `uid-study-empty`, `uid-series-empty`, and `uid-sop-empty-dataset-only` (the command carries a good SOP
/// Instance UID); an empty SOP Instance UID in both the command and the dataset is `uid-sop-empty`.
pub fn uid_bad_values() -> Vec<(&'static str, String)> {
    crate::common::bad_uids()
}

pub(super) fn uid_cases(b: &Bases) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut n = 5000u32;
    for (attr, tag) in
        [("study", tags::STUDY_INSTANCE_UID), ("series", tags::SERIES_INSTANCE_UID), ("sop", tags::SOP_INSTANCE_UID)]
    {
        for (label, value) in uid_bad_values() {
            n += 1;
            let sop = if attr == "sop" { value.clone() } else { b.sop(n) };
            let mut o = with_uid(&b.object, &sop);
            o.put(DataElement::new(tag, VR::UI, PrimitiveValue::from(value.as_str())));
            let d = encode(&o, EXPLICIT);
            cases.push(store_case(&format!("uid-{attr}-{label}"), EXPLICIT, &sop, d, CANNOT_UNDERSTAND));
        }
    }
    for (attr, tag) in [("study", tags::STUDY_INSTANCE_UID), ("series", tags::SERIES_INSTANCE_UID)] {
        n += 1;
        let sop = b.sop(n);
        let mut o = with_uid(&b.object, &sop);
        o.put(DataElement::new(tag, VR::UI, PrimitiveValue::from("")));
        let d = encode(&o, EXPLICIT);
        cases.push(store_case(&format!("uid-{attr}-empty"), EXPLICIT, &sop, d, CANNOT_UNDERSTAND));
    }
    n += 1;
    let d = encode(&with_uid(&b.object, ""), EXPLICIT);
    cases.push(store_case("uid-sop-empty-dataset-only", EXPLICIT, &b.sop(n), d.clone(), CANNOT_UNDERSTAND));
    cases.push(store_case("uid-sop-empty", EXPLICIT, "", d, CANNOT_UNDERSTAND));
    cases
}

pub(super) fn encapsulated_cases(b: &Bases) -> Vec<Case> {
    let mut cases = Vec::new();
    let (rle_uid, rle) = (&b.rle.0, &b.rle.1);
    let (jpeg_uid, jpeg) = (&b.jpeg.0, &b.jpeg.1);
    let (defl_uid, defl) = (&b.deflated.0, &b.deflated.1);
    // Each encapsulated variant needs its own SOP Instance UID, and the UID is inside the bytes: re-encoding
    // by DCMTK gave each base one; variants replace it in place with a same-length UID (last digit changed).
    let variant = |data: &[u8], uid: &str, k: u32| -> (String, Vec<u8>) {
        assert!(k < 10);
        let new = format!("{}{}", &uid[..uid.len() - 1], k);
        let pos = data.windows(uid.len()).position(|w| w == uid.as_bytes()).expect("uid in dataset");
        let mut d = data.to_vec();
        d[pos..pos + uid.len()].copy_from_slice(new.as_bytes());
        (new, d)
    };

    cases.push(store_case("rle-valid", RLE, rle_uid, rle.clone(), SUCCESS));
    cases.push(store_case("jpeg-lossless-valid", JPEG_SV1, jpeg_uid, jpeg.clone(), SUCCESS));
    // DCMTK's storescu proposes Deflated Explicit VR LE when asked to (-xd); we offer it, so we must store it.
    cases.push(store_case("deflated-valid", DEFLATED, defl_uid, defl.clone(), SUCCESS));

    let (u, mut d) = variant(rle, rle_uid, 1);
    let f = first_fragment(&d);
    let flen = u32::from_le_bytes(d[f + 4..f + 8].try_into().unwrap());
    d[f + 4..f + 8].copy_from_slice(&(flen + 100_000).to_le_bytes());
    cases.push(store_case("rle-fragment-length-overrun", RLE, &u, d, CANNOT_UNDERSTAND));

    let (u, d) = variant(rle, rle_uid, 2);
    cases.push(store_case("rle-cut-inside-fragment", RLE, &u, d[..d.len() - 8 - 500].to_vec(), CANNOT_UNDERSTAND));

    let (u, d) = variant(rle, rle_uid, 3);
    cases.push(store_case("rle-no-sequence-delimitation", RLE, &u, d[..d.len() - 8].to_vec(), CANNOT_UNDERSTAND));

    let (u, d) = variant(rle, rle_uid, 4);
    let f = first_fragment(&d);
    let mut cut = d[..f].to_vec();
    cut.extend_from_slice(&SEQ_DELIM);
    cases.push(store_case("rle-offset-table-only", RLE, &u, cut, CANNOT_UNDERSTAND));

    // Rows×Columns claiming 8 GiB over a small valid fragment: refused before any decoder sees it.
    let (u, mut d) = variant(rle, rle_uid, 5);
    for t in [tags::ROWS, tags::COLUMNS] {
        let at = locate(&d, t);
        d[at.value..at.value + 2].copy_from_slice(&65_535u16.to_le_bytes());
    }
    cases.push(store_case("rle-rows-columns-65535", RLE, &u, d, CANNOT_UNDERSTAND));

    // More frames than fragments: a decoder would be asked for frames that are not there.
    let (u, mut d) = variant(rle, rle_uid, 8);
    let nf = b"2147483647";
    let mut elem = vec![0x28, 0x00, 0x08, 0x00, b'I', b'S'];
    elem.extend_from_slice(&(nf.len() as u16).to_le_bytes());
    elem.extend_from_slice(nf);
    d = insert_raw(&d, Tag(0x0028, 0x0008), &elem);
    cases.push(store_case("rle-frames-more-than-fragments", RLE, &u, d, CANNOT_UNDERSTAND));

    // Structurally sound fragments whose codec payload lies: stored (the spool never decodes pixels; nothing
    // acknowledged is lost), then the slice is reported as not analysable without the daemon allocating or
    // crashing — the test checks the result's slice_errors.
    let (u, mut d) = variant(rle, rle_uid, 6);
    let f = first_fragment(&d) + 8;
    d[f..f + 4].copy_from_slice(&15u32.to_le_bytes());
    for i in 0..15 {
        d[f + 4 + 4 * i..f + 8 + 4 * i].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    }
    cases.push(store_case("rle-header-offsets-out-of-range", RLE, &u, d, SUCCESS));

    let (u, mut d) = variant(rle, rle_uid, 7);
    let f = first_fragment(&d) + 8;
    let flen = u32::from_le_bytes(d[f - 4..f].try_into().unwrap()) as usize;
    for byte in &mut d[f + 64..f + flen] {
        *byte = 0x80; // RLE "no-op" run headers only: decodes to nothing
    }
    cases.push(store_case("rle-segments-decode-short", RLE, &u, d, SUCCESS));

    let (u, mut d) = variant(jpeg, jpeg_uid, 1);
    let f = first_fragment(&d) + 8;
    let sof = d[f..].windows(2).position(|w| w == [0xFF, 0xC3]).expect("SOF3") + f;
    d[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    cases.push(store_case("jpeg-sof-claims-65535x65535", JPEG_SV1, &u, d, SUCCESS));

    let (u, mut d) = variant(jpeg, jpeg_uid, 2);
    let f = first_fragment(&d);
    let flen = u32::from_le_bytes(d[f + 4..f + 8].try_into().unwrap()) as usize;
    let keep = (flen / 3) & !1;
    let tail = d[f + 8 + flen..].to_vec();
    d.truncate(f + 8 + keep);
    d[f + 4..f + 8].copy_from_slice(&(keep as u32).to_le_bytes());
    d.extend_from_slice(&tail);
    cases.push(store_case("jpeg-codestream-cut-short", JPEG_SV1, &u, d, SUCCESS));

    let (u, mut d) = variant(jpeg, jpeg_uid, 3);
    let f = first_fragment(&d) + 8;
    let flen = u32::from_le_bytes(d[f - 4..f].try_into().unwrap()) as usize;
    let junk = noise(11, flen);
    d[f..f + flen].copy_from_slice(&junk);
    cases.push(store_case("jpeg-fragment-noise", JPEG_SV1, &u, d, SUCCESS));

    // (The UID sits inside the compressed stream, so the command names a fresh one: refused either way.)
    let u = b.sop(802);
    cases.push(store_case("deflated-truncated", DEFLATED, &u, defl[..defl.len() / 2].to_vec(), CANNOT_UNDERSTAND));
    let s = b.sop(800);
    cases.push(store_case("deflated-not-deflate", DEFLATED, &s, noise(12, 3000), CANNOT_UNDERSTAND));
    // A deflate bomb: 64 MiB of zeros compresses to ~64 KiB; inflating it must stop at the message cap.
    let s = b.sop(801);
    let bomb = {
        use std::io::Write;
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..64 {
            e.write_all(&zeros).unwrap();
        }
        e.finish().unwrap()
    };
    cases.push(store_case("deflated-bomb-64mib", DEFLATED, &s, bomb, CANNOT_UNDERSTAND));
    cases
}
