//! eval::images — the 2D image folders `lungsentry eval --images` reads: PNG and JPEG as 8-bit grayscale, and the
//! files of a folder by stem (an image is matched to its mask by file name).
//!
//! Owns: decoding (first channel of colour images; 16-bit PNG by its high byte, 9–16-bit JPEG scaled down by its
//! sample precision). Hands on: [`GrayImage`]s. Never: resizes, normalises or judges a pixel (that is the model's input
//! contract and the metrics).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// An 8-bit grayscale image read from a PNG (first channel of colour images, 16-bit reduced to its high byte).
pub struct GrayImage {
    pub rows: usize,
    pub cols: usize,
    pub px: Vec<u8>,
}

/// Reads a PNG as 8-bit grayscale.
pub fn read_png_gray(path: &Path) -> Result<GrayImage> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(f));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().with_context(|| format!("reading PNG header of {}", path.display()))?;
    let size = reader.output_buffer_size().context("PNG too large")?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).with_context(|| format!("decoding {}", path.display()))?;
    let channels = match info.color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{}: palette PNG was not expanded", path.display()),
    };
    let (rows, cols) = (info.height as usize, info.width as usize);
    let line = info.line_size;
    let mut px = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row = &buf[r * line..r * line + cols * channels];
        px.extend(row.chunks_exact(channels).map(|c| c[0]));
    }
    Ok(GrayImage { rows, cols, px })
}

/// Image file extensions `--images`, `--masks` and `--lungs` read (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Reads a PNG or JPEG (by extension) as 8-bit grayscale: [`read_png_gray`] or [`read_jpeg_gray`].
pub fn read_gray_image(path: &Path) -> Result<GrayImage> {
    match path.extension().and_then(|x| x.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("jpg" | "jpeg") => read_jpeg_gray(path),
        _ => read_png_gray(path),
    }
}

/// The sample precision (bits) of a JPEG stream's first frame header (SOF0–SOF15 but DHT/JPG/DAC).
fn jpeg_precision(bytes: &[u8]) -> Option<u8> {
    let mut i = 2;
    while i + 4 < bytes.len() {
        if bytes[i] != 0xFF {
            return None;
        }
        let marker = bytes[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        if (0xC0..=0xCF).contains(&marker) && ![0xC4, 0xC8, 0xCC].contains(&marker) {
            return bytes.get(i + 4).copied();
        }
        let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
        i += 2 + len;
    }
    None
}

/// Reads a JPEG (baseline, progressive or lossless; jpeg-decoder) as 8-bit grayscale: 8-bit samples as they are,
/// 9–16-bit samples scaled down by their precision (a 12-bit sample loses its low 4 bits), colour by its first
/// channel.
pub fn read_jpeg_gray(path: &Path) -> Result<GrayImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut dec = jpeg_decoder::Decoder::new(std::io::Cursor::new(&bytes));
    let data = dec.decode().with_context(|| format!("decoding JPEG {}", path.display()))?;
    let info = dec.info().with_context(|| format!("{}: no JPEG frame", path.display()))?;
    let (rows, cols) = (info.height as usize, info.width as usize);
    let px: Vec<u8> = match info.pixel_format {
        jpeg_decoder::PixelFormat::L8 => data,
        jpeg_decoder::PixelFormat::L16 => {
            let shift = jpeg_precision(&bytes).unwrap_or(16).clamp(9, 16) - 8;
            data.chunks_exact(2).map(|b| (u16::from_ne_bytes([b[0], b[1]]) >> shift).min(255) as u8).collect()
        }
        jpeg_decoder::PixelFormat::RGB24 => data.chunks_exact(3).map(|c| c[0]).collect(),
        jpeg_decoder::PixelFormat::CMYK32 => data.chunks_exact(4).map(|c| c[0]).collect(),
    };
    if px.len() != rows * cols {
        bail!("{}: decoded {} pixels for {rows}×{cols}", path.display(), px.len());
    }
    Ok(GrayImage { rows, cols, px })
}

/// Image files of a folder by stem, only the given extensions (lower case compare).
pub(super) fn files_by_stem(dir: &Path, exts: &[&str]) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let p = e?.path();
        let ok = p.extension().and_then(|x| x.to_str()).is_some_and(|x| exts.iter().any(|e| x.eq_ignore_ascii_case(e)));
        if ok {
            if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                out.insert(stem.to_string(), p);
            }
        }
    }
    Ok(out)
}
