//! phantom — synthetic chest CT series with ground truth (owned by the phantom work; see issue 3).

use anyhow::{bail, Result};
use std::path::PathBuf;

/// `lungsentry phantom` options.
#[derive(clap::Args, Debug, Clone)]
pub struct PhantomArgs {
    /// Output folder (created); gets the DICOM files, labels and truth.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Random seed; the same seed gives the same series byte for byte.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Number of slices.
    #[arg(long, default_value_t = 120)]
    pub slices: usize,
    /// Rows = columns.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Slice thickness (= spacing) in mm; chosen from the seed when absent.
    #[arg(long)]
    pub thickness: Option<f64>,
    /// Lesion burden.
    #[arg(long, default_value = "moderate")]
    pub severity: String,
    /// Make a follow-up study of the patient in this earlier phantom folder, with known lesion changes.
    #[arg(long)]
    pub follow_up_of: Option<PathBuf>,
}

pub fn run(_args: PhantomArgs) -> Result<()> {
    bail!("phantom: not built yet")
}
