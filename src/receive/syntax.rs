//! syntax — which SOP classes (abstract syntaxes) and transfer syntaxes the receiver negotiates.
//!
//! Owns: the two lists offered in A-ASSOCIATE-AC and the helpers that classify a transfer syntax.
//! Hands on: nothing; `association` builds its negotiation options from these lists, `scu` uses the helpers.
//! Never: decides which one of a sender's proposed transfer syntaxes wins — that is always the sender's first
//! proposal among ours (dicom-ul walks the proposal in the sender's order).

use dicom_dictionary_std::uids;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

/// SOP classes a CT scanner sends with a series, plus Verification (C-ECHO).
///
/// Only CT and Enhanced CT are analysed downstream; the rest are accepted so that a scanner pushing a whole
/// study (dose reports, secondary captures, presentation states, raw data) does not see failures.
pub const ABSTRACT_SYNTAXES: &[&str] = &[
    uids::VERIFICATION,
    uids::CT_IMAGE_STORAGE,
    uids::ENHANCED_CT_IMAGE_STORAGE,
    uids::LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
    uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_SINGLE_BIT_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_BYTE_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_GRAYSCALE_WORD_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::MULTI_FRAME_TRUE_COLOR_SECONDARY_CAPTURE_IMAGE_STORAGE,
    uids::X_RAY_RADIATION_DOSE_SR_STORAGE,
    uids::ENHANCED_SR_STORAGE,
    uids::COMPREHENSIVE_SR_STORAGE,
    uids::BASIC_TEXT_SR_STORAGE,
    uids::GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
    uids::RAW_DATA_STORAGE,
];

/// Transfer syntaxes we accept for storage: the uncompressed and deflated ones, RLE, lossless JPEG
/// (process 14 and its selection value 1), JPEG-LS (lossless and near-lossless, decoded by CharLS), JPEG 2000
/// (lossless and lossy) and baseline JPEG.
/// Datasets are kept as received (a deflated one is stored inflated, see `spool`); decoding happens in
/// `decode`.
pub const TRANSFER_SYNTAXES: &[&str] = &[
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    uids::IMPLICIT_VR_LITTLE_ENDIAN,
    uids::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    uids::RLE_LOSSLESS,
    uids::JPEG_LOSSLESS_SV1,
    uids::JPEG_LOSSLESS,
    uids::JPEGLS_LOSSLESS,
    uids::JPEGLS_NEAR_LOSSLESS,
    uids::JPEG2000_LOSSLESS,
    uids::JPEG2000,
    uids::JPEG_BASELINE8_BIT,
];

/// Trims the NUL/space padding DICOM puts after odd-length UIDs.
pub fn trim_uid(uid: &str) -> &str {
    uid.trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
}

/// Whether a dataset in this transfer syntax can be re-encoded into another native one by parsing and
/// writing it again (no pixel codec involved): true for the uncompressed and deflated syntaxes.
pub fn is_native(ts_uid: &str) -> bool {
    TransferSyntaxRegistry
        .get(trim_uid(ts_uid))
        .map(|ts| !ts.is_unsupported() && !ts.is_encapsulated_pixel_data())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_offered_transfer_syntax_is_parseable() {
        for ts in TRANSFER_SYNTAXES {
            assert!(dicom_ul::association::server::is_supported(ts), "{ts} not in the registry");
        }
    }

    #[test]
    fn native_classification() {
        assert!(is_native(uids::IMPLICIT_VR_LITTLE_ENDIAN));
        assert!(is_native(uids::EXPLICIT_VR_LITTLE_ENDIAN));
        assert!(is_native("1.2.840.10008.1.2.1\0"));
        assert!(!is_native(uids::JPEG2000_LOSSLESS));
        assert!(!is_native(uids::RLE_LOSSLESS));
        assert!(!is_native("1.2.3.4"));
    }
}
