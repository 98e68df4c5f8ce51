//! Configuration: the TOML file parsed once into typed structs and validated.
//!
//! Owns: every tunable the daemon reads, their defaults (the "embedded defaults" used when `serve` gets no
//! `--config`), and validation with messages that name the offending key. Unknown keys are rejected by serde
//! (`deny_unknown_fields`) so a typo never silently falls back to a default.
//! Hands on: the typed sections to the stages that read them — `[outputs]` included ([`OutputsConfig`],
//! [`DicomDestination`], [`ObjectKind`]; `outputs` re-exports them), so this module imports nothing else of the
//! crate and sits below every module that is configured.
//! Never: reads the environment or touches the disk beyond reading the one file it is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// DICOM listener: AE title, port, association limits, who may send.
    pub dicom: DicomConfig,
    /// When a series counts as complete and whether it is eligible for analysis.
    pub series: SeriesConfig,
    /// Thresholds of the analysis.
    pub analysis: AnalysisConfig,
    /// Which inference engine runs the model.
    pub engine: EngineConfig,
    /// Where received instances, the database and masks live.
    pub storage: StorageConfig,
    /// Where positive results are sent.
    pub alerts: AlertsConfig,
    /// Dashboard, metrics and health endpoints.
    pub http: HttpConfig,
    /// DICOM outputs (SEG, SR, key images) and their C-STORE destinations.
    pub outputs: OutputsConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DicomConfig {
    /// Our AE title; associations that call another AE title are rejected.
    pub ae_title: String,
    /// Address to bind the listener to.
    pub bind: String,
    /// TCP port of the listener.
    pub port: u16,
    /// Associations served at once; further peers wait in the accept queue.
    pub max_associations: usize,
    /// Largest single DIMSE message (command + dataset) accepted, in MiB; bigger gets a failure status.
    pub max_message_mb: usize,
    /// Memory budget, in MiB, for every DIMSE dataset buffered at once across all associations (bytes received
    /// and not yet spooled, plus the spool's working copy of each). A message whose buffer would grow past it is
    /// refused with 0xA700 (out of resources) and the rest of it is read and dropped, never allocated. At least
    /// twice `max_message_mb` (one maximum-size message and its working copy always fit).
    pub max_buffered_mb: usize,
    /// An association with no PDU for this long is aborted.
    pub association_idle_timeout_s: u64,
    /// Calling AE + peer address pairs allowed to associate; empty = anyone (warned at start).
    pub allowed_peers: Vec<AllowedPeer>,
    /// DICOM over TLS: when set, every association on the port is TLS (no plaintext fallback).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
}

/// `[dicom.tls]`: the listener's certificate and key, and optional client-certificate verification. The files are
/// read when the daemon starts (see `receive::tls`); problems there are start-up errors naming the key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with our certificate chain (leaf first).
    pub cert: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1), unencrypted.
    pub key: PathBuf,
    /// PEM file of CA certificates that client certificates are verified against. Without it no client
    /// certificate is asked for; with it a presented certificate must chain to one of these.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Refuse peers without a client certificate signed by `ca` (needs `ca`).
    #[serde(default)]
    pub require_client_cert: bool,
    /// A connection must finish the TLS handshake and send its A-ASSOCIATE-RQ within this many seconds, or it is
    /// dropped (frees its association slot).
    #[serde(default = "default_tls_handshake_timeout_s")]
    pub handshake_timeout_s: u64,
}

fn default_tls_handshake_timeout_s() -> u64 {
    10
}

/// One entry of the allow-list: both the calling AE title and the peer host must match.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AllowedPeer {
    /// Calling AE title the peer presents.
    pub ae_title: String,
    /// Peer IP address (exact match) the association must come from.
    pub host: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeriesConfig {
    /// Seconds without a new instance, after the association released, before a series is complete.
    pub quiet_period_s: f64,
    /// Seconds without a new instance before a series is complete even without a release.
    pub stable_timeout_s: f64,
    /// Seconds after the senders released (and after the last instance) before a series whose slices form one
    /// gap-free, evenly spaced stack is complete: the time a sender that splits a series over associations takes to
    /// open its next one (see `series::CompletionTracker`). Well under `quiet_period_s`, which still applies to
    /// series that are not such a stack.
    pub release_settle_s: f64,
    /// Fewer slices than this: the daemon skips the series (stated reason).
    pub min_slices: usize,
    /// Thicker slices than this: the daemon skips the series (stated reason).
    pub max_slice_thickness_mm: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisConfig {
    /// A series is positive when involvement (lesion / lung volume × 100) exceeds this.
    pub positive_threshold_percent: f64,
    /// 3D lesion components smaller than this (mL) are dropped as noise.
    pub min_lesion_volume_ml: f64,
    /// Lesion pixels less dense than this (HU) count as aerated lung, not lesion; unset: no floor.
    pub lesion_min_hu: Option<f64>,
    /// A lesion lying, one slice thick, on the non-lung tissue of the slice below (a diaphragm or heart dome cut by
    /// the slice: partial volume) counts as lung (`analysis::series::PARTIAL_VOLUME_FRACTION`).
    pub partial_volume_rule: bool,
    /// Follow-up: a "progression" alert when involvement rises by more than this % of the prior study's...
    pub progression_relative_percent: f64,
    /// ...and by more than this many percentage points.
    pub progression_absolute_points: f64,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Fastest available engine (ort when its library loads, else tract).
    Auto,
    /// tract-onnx, pure Rust, always built.
    Tract,
    /// ONNX Runtime loaded at run time.
    Ort,
    /// TensorRT FP16 (feature `tensorrt`); where it cannot load, a warning and the `Auto` engine.
    Tensorrt,
}

impl std::str::FromStr for EngineKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => EngineKind::Auto,
            "tract" => EngineKind::Tract,
            "ort" => EngineKind::Ort,
            "tensorrt" => EngineKind::Tensorrt,
            other => bail!("unknown engine {other:?} (expected auto, tract, ort or tensorrt)"),
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Which engine runs the model.
    pub kind: EngineKind,
    /// Model manifest; the model file is found relative to it.
    pub manifest: PathBuf,
    /// Folder of serialized TensorRT engines (`scripts/build-engine` writes them, named by model sha256, GPU and
    /// TensorRT version).
    pub tensorrt_engines: PathBuf,
    /// Seconds of queued slice segmentation above which C-STORE responses wait (the sender is paced at the
    /// engine's speed); below it instances are answered as soon as they are on disk. Bounds the last-slice-to-alert
    /// latency of an unpaced sender to about this plus the 3D analysis.
    pub max_backlog_s: f64,
    /// Longest a C-STORE response is held by that pacing, seconds: well under any scanner's DIMSE timeout (often
    /// 30–60 s; DCMTK's own default is none). Past it the instance is answered at disk speed anyway and the backlog
    /// grows on disk (the spool holds the pixels); the latency it costs shows in `/metrics`
    /// (`lungsentry_backlog_seconds`, `lungsentry_response_hold_*`).
    pub max_response_hold_s: f64,
    /// Nice levels below the daemon at which slice segmentation (and the engine's worker threads) run, so that
    /// receiving, which the scanner waits on, goes first on a busy CPU (0 = same priority; at most 19).
    pub segment_nice: i32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Root of the spool, the SQLite database and derived outputs.
    pub data_dir: PathBuf,
    /// `/readyz` reports not ready when the data dir's file system is fuller than this (percent used).
    pub disk_high_water_percent: f64,
    /// Spooled pixel data (instance files) of finished series is purged this many hours after the series' last
    /// instance (results, alerts and outputs rows are kept). Fractions allowed; 0 = keep pixels until disk
    /// pressure purges them.
    pub retention_hours: f64,
    /// When the data dir's file system is fuller than this (percent used), pixel data of finished series is
    /// purged oldest first until it is not. Normally below `disk_high_water_percent`, so purging starts before
    /// /readyz fails (the daemon warns at start otherwise).
    pub purge_high_water_percent: f64,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AlertsConfig {
    /// Positive results are POSTed here as JSON (none = no webhook).
    pub webhook_url: Option<String>,
    /// When set, the body is signed: header `X-Lungsentry-Signature: sha256=<hex HMAC-SHA256>`.
    pub webhook_secret: Option<String>,
    /// Salt of the `patient_key` hash; a random one is generated into the data dir when unset.
    pub patient_key_salt: Option<String>,
    /// Webhook bodies also carry `patient_name`, `patient_id` and `accession_number` (for RIS bridges that need
    /// them). Off by default: bodies and logs carry only the pseudonymous `patient_key`.
    pub include_patient_identifiers: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the dashboard/metrics/health server ("" disables it).
    pub bind: String,
    /// Access token of everything but `/healthz`; unset = a random one kept in `data_dir/http-token`.
    pub token: Option<String>,
    /// Dashboard live-view (SSE, `/api/events`) clients served at once; one more is refused with HTTP 503.
    pub max_sse_clients: usize,
}

impl Default for DicomConfig {
    fn default() -> Self {
        DicomConfig {
            ae_title: "LUNGSENTRY".into(),
            bind: "0.0.0.0".into(),
            port: 11112,
            max_associations: 16,
            max_message_mb: 256,
            max_buffered_mb: 1024,
            association_idle_timeout_s: 60,
            allowed_peers: Vec::new(),
            tls: None,
        }
    }
}

impl Default for SeriesConfig {
    fn default() -> Self {
        SeriesConfig {
            quiet_period_s: 2.0,
            stable_timeout_s: 30.0,
            release_settle_s: 0.15,
            min_slices: 20,
            max_slice_thickness_mm: 5.0,
        }
    }
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            positive_threshold_percent: 0.4,
            min_lesion_volume_ml: 0.01,
            lesion_min_hu: None,
            partial_volume_rule: false,
            progression_relative_percent: 50.0,
            progression_absolute_points: 1.0,
        }
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            kind: EngineKind::Auto,
            manifest: default_manifest_path(),
            tensorrt_engines: PathBuf::from("/var/lib/lungsentry/engines"),
            max_backlog_s: 2.0,
            max_response_hold_s: 1.5,
            segment_nice: 10,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./lungsentry-data"),
            disk_high_water_percent: 90.0,
            retention_hours: 72.0,
            purge_high_water_percent: 85.0,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { bind: "127.0.0.1:8080".into(), token: None, max_sse_clients: 64 }
    }
}

/// Where the model manifest is looked for when the config does not say: `LUNGSENTRY_MODEL_MANIFEST`, then
/// `/usr/share/lungsentry/models/manifest.toml` (the .deb), then `models/manifest.toml` beside the crate.
pub fn default_manifest_path() -> PathBuf {
    if let Ok(p) = std::env::var("LUNGSENTRY_MODEL_MANIFEST") {
        return PathBuf::from(p);
    }
    let installed = PathBuf::from("/usr/share/lungsentry/models/manifest.toml");
    if installed.exists() {
        return installed;
    }
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/models/manifest.toml"))
}

impl Config {
    /// Reads and validates a TOML file; errors name the file and the key.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in config {}", path.display()))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config> {
        let cfg: Config = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot: ranges and formats, each error naming its key.
    pub fn validate(&self) -> Result<()> {
        let d = &self.dicom;
        if d.ae_title.is_empty() || d.ae_title.len() > 16 || !d.ae_title.is_ascii() {
            bail!("dicom.ae_title must be 1-16 ASCII characters, got {:?}", d.ae_title);
        }
        if d.bind.parse::<std::net::IpAddr>().is_err() {
            bail!("dicom.bind must be an IP address, got {:?}", d.bind);
        }
        if d.max_associations == 0 {
            bail!("dicom.max_associations must be at least 1");
        }
        if d.max_message_mb == 0 {
            bail!("dicom.max_message_mb must be at least 1");
        }
        if d.max_buffered_mb < d.max_message_mb.saturating_mul(2) {
            bail!(
                "dicom.max_buffered_mb ({}) must be at least twice dicom.max_message_mb ({}): a maximum-size message \
                 and the spool's working copy of it must fit",
                d.max_buffered_mb,
                d.max_message_mb
            );
        }
        if d.association_idle_timeout_s == 0 {
            bail!("dicom.association_idle_timeout_s must be at least 1");
        }
        for (i, p) in d.allowed_peers.iter().enumerate() {
            if p.ae_title.is_empty() || p.ae_title.len() > 16 {
                bail!("dicom.allowed_peers[{i}].ae_title must be 1-16 characters");
            }
            if p.host.parse::<std::net::IpAddr>().is_err() {
                bail!("dicom.allowed_peers[{i}].host must be an IP address, got {:?}", p.host);
            }
        }
        if let Some(t) = &d.tls {
            if t.cert.as_os_str().is_empty() {
                bail!("dicom.tls.cert must name a PEM certificate file");
            }
            if t.key.as_os_str().is_empty() {
                bail!("dicom.tls.key must name a PEM private key file");
            }
            if t.ca.as_ref().is_some_and(|c| c.as_os_str().is_empty()) {
                bail!("dicom.tls.ca must name a PEM file of CA certificates (or be left out)");
            }
            if t.require_client_cert && t.ca.is_none() {
                bail!("dicom.tls.require_client_cert needs dicom.tls.ca (the CA that signs client certificates)");
            }
            if t.handshake_timeout_s == 0 {
                bail!("dicom.tls.handshake_timeout_s must be at least 1");
            }
        }
        let s = &self.series;
        if !(self.engine.max_backlog_s > 0.0 && self.engine.max_backlog_s.is_finite()) {
            bail!("engine.max_backlog_s must be > 0");
        }
        if !(self.engine.max_response_hold_s >= 0.0 && self.engine.max_response_hold_s <= 10.0) {
            bail!("engine.max_response_hold_s must be within 0..=10 (seconds; scanners time out at 30-60 s)");
        }
        if !(0..=19).contains(&self.engine.segment_nice) {
            bail!("engine.segment_nice must be 0..=19");
        }
        if !(s.quiet_period_s >= 0.0 && s.quiet_period_s.is_finite()) {
            bail!("series.quiet_period_s must be >= 0");
        }
        if !(s.stable_timeout_s > 0.0 && s.stable_timeout_s.is_finite()) {
            bail!("series.stable_timeout_s must be > 0");
        }
        if !(s.release_settle_s >= 0.0 && s.release_settle_s.is_finite()) {
            bail!("series.release_settle_s must be >= 0");
        }
        if s.min_slices == 0 {
            bail!("series.min_slices must be at least 1");
        }
        if !(s.max_slice_thickness_mm > 0.0) {
            bail!("series.max_slice_thickness_mm must be > 0");
        }
        let a = &self.analysis;
        if !(0.0..=100.0).contains(&a.positive_threshold_percent) {
            bail!("analysis.positive_threshold_percent must be within 0..=100");
        }
        if !(a.min_lesion_volume_ml >= 0.0) {
            bail!("analysis.min_lesion_volume_ml must be >= 0");
        }
        if let Some(h) = a.lesion_min_hu {
            if !(-1024.0..=0.0).contains(&h) {
                bail!("analysis.lesion_min_hu must be within -1024..=0 HU, got {h}");
            }
        }
        if !(a.progression_relative_percent >= 0.0) {
            bail!("analysis.progression_relative_percent must be >= 0");
        }
        if !(a.progression_absolute_points >= 0.0) {
            bail!("analysis.progression_absolute_points must be >= 0");
        }
        if let Some(url) = &self.alerts.webhook_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("alerts.webhook_url must start with http:// or https://, got {url:?}");
            }
        }
        if !self.http.bind.is_empty() && self.http.bind.parse::<SocketAddr>().is_err() {
            bail!("http.bind must be ADDRESS:PORT (or empty to disable), got {:?}", self.http.bind);
        }
        if self.http.max_sse_clients == 0 {
            bail!("http.max_sse_clients must be at least 1");
        }
        let hw = self.storage.disk_high_water_percent;
        if !(hw > 0.0 && hw <= 100.0) {
            bail!("storage.disk_high_water_percent must be within 0 (exclusive) ..= 100, got {hw}");
        }
        let rh = self.storage.retention_hours;
        if !(rh >= 0.0 && rh.is_finite()) {
            bail!("storage.retention_hours must be a finite number >= 0 (0 = no time-based purge), got {rh}");
        }
        let phw = self.storage.purge_high_water_percent;
        if !(phw > 0.0 && phw <= 100.0) {
            bail!("storage.purge_high_water_percent must be within 0 (exclusive) ..= 100, got {phw}");
        }
        self.outputs.validate()?;
        Ok(())
    }
}

/// `[outputs]`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutputsConfig {
    /// Most key images per series (the slices with the largest lesion area).
    pub key_images: usize,
    /// Failed attempts after which an object is parked (kept, visible in metrics, not retried).
    pub max_attempts: u32,
    /// C-STORE destinations (`[[outputs.dicom]]`); none = no DICOM outputs are made by the daemon.
    pub dicom: Vec<DicomDestination>,
}

impl Default for OutputsConfig {
    fn default() -> Self {
        OutputsConfig { key_images: 3, max_attempts: 20, dicom: Vec::new() }
    }
}

/// One `[[outputs.dicom]]` destination.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DicomDestination {
    /// Called AE title of the receiver (PACS).
    pub ae_title: String,
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Which objects it gets: any of "seg", "sr", "key_images" (default all three).
    #[serde(default = "all_objects")]
    pub objects: Vec<ObjectKind>,
    /// Only results flagged positive are sent (default false: every analysed series).
    #[serde(default)]
    pub only_positive: bool,
}

fn all_objects() -> Vec<ObjectKind> {
    ObjectKind::ALL.to_vec()
}

impl DicomDestination {
    /// The name rows and logs use: `AE@host:port`.
    pub fn key(&self) -> String {
        format!("{}@{}:{}", self.ae_title, self.host, self.port)
    }
}

impl OutputsConfig {
    /// Range checks, each naming its key.
    pub fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 {
            bail!("outputs.max_attempts must be at least 1");
        }
        for (i, d) in self.dicom.iter().enumerate() {
            if d.ae_title.is_empty() || d.ae_title.len() > 16 || !d.ae_title.is_ascii() {
                bail!("outputs.dicom[{i}].ae_title must be 1-16 ASCII characters, got {:?}", d.ae_title);
            }
            if d.host.is_empty() {
                bail!("outputs.dicom[{i}].host must not be empty");
            }
            if d.port == 0 {
                bail!("outputs.dicom[{i}].port must be 1-65535");
            }
            if d.objects.is_empty() {
                bail!("outputs.dicom[{i}].objects must name at least one of seg, sr, key_images");
            }
        }
        Ok(())
    }
}

/// Which kind of DICOM output object (`[[outputs.dicom]].objects`, the outbox rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectKind {
    /// DICOM Segmentation.
    Seg,
    /// TID 1500 structured report.
    Sr,
    /// Secondary Capture key images.
    KeyImages,
}

impl ObjectKind {
    /// The config / database spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Seg => "seg",
            ObjectKind::Sr => "sr",
            ObjectKind::KeyImages => "key_images",
        }
    }

    /// Every kind.
    pub const ALL: [ObjectKind; 3] = [ObjectKind::Seg, ObjectKind::Sr, ObjectKind::KeyImages];
}

impl std::str::FromStr for ObjectKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seg" => Ok(ObjectKind::Seg),
            "sr" => Ok(ObjectKind::Sr),
            "key_images" => Ok(ObjectKind::KeyImages),
            other => Err(format!("unknown DICOM output {other:?} (expected seg, sr or key_images)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_embedded_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.dicom.ae_title, "LUNGSENTRY");
        assert_eq!(c.dicom.port, 11112);
        assert_eq!(c.series.quiet_period_s, 2.0);
        assert_eq!(c.analysis.positive_threshold_percent, 0.4);
        assert_eq!(c.engine.kind, EngineKind::Auto);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[dicom]\nae_titel = \"X\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("ae_titel"), "{e:#}");
        let e = Config::parse("[dicomm]\n").unwrap_err();
        assert!(format!("{e:#}").contains("dicomm"), "{e:#}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = Config::parse("[dicom]\nport = 70000\n").unwrap_err();
        assert!(format!("{e:#}").contains("port"), "{e:#}");
        let e = Config::parse("[series]\nmin_slices = 0\n").unwrap_err();
        assert!(format!("{e:#}").contains("series.min_slices"), "{e:#}");
        let e = Config::parse("[[dicom.allowed_peers]]\nae_title = \"CT1\"\nhost = \"not-an-ip\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("allowed_peers[0].host"), "{e:#}");
        let e = Config::parse("[alerts]\nwebhook_url = \"ftp://x\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("alerts.webhook_url"), "{e:#}");
        let e = Config::parse("[storage]\nretention_hours = -1\n").unwrap_err();
        assert!(format!("{e:#}").contains("storage.retention_hours"), "{e:#}");
        let e = Config::parse("[storage]\npurge_high_water_percent = 150.0\n").unwrap_err();
        assert!(format!("{e:#}").contains("storage.purge_high_water_percent"), "{e:#}");
        let c = Config::parse("[storage]\nretention_hours = 0.001\n").unwrap();
        assert_eq!(c.storage.retention_hours, 0.001);
    }

    #[test]
    fn tls_section() {
        let c = Config::parse("[dicom.tls]\ncert = \"/etc/c.pem\"\nkey = \"/etc/k.pem\"\n").unwrap();
        let t = c.dicom.tls.unwrap();
        assert_eq!((t.ca, t.require_client_cert, t.handshake_timeout_s), (None, false, 10));
        let e = Config::parse("[dicom.tls]\ncert = \"/etc/c.pem\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("key"), "{e:#}");
        let e = Config::parse("[dicom.tls]\ncert = \"c\"\nkey = \"k\"\nrequire_client_cert = true\n").unwrap_err();
        assert!(format!("{e:#}").contains("dicom.tls.require_client_cert"), "{e:#}");
        let e = Config::parse("[dicom.tls]\ncert = \"c\"\nkey = \"k\"\nhandshake_timeout_s = 0\n").unwrap_err();
        assert!(format!("{e:#}").contains("dicom.tls.handshake_timeout_s"), "{e:#}");
        let e = Config::parse("[dicom.tls]\ncert = \"c\"\nkey = \"k\"\ncafile = \"x\"\n").unwrap_err();
        assert!(format!("{e:#}").contains("cafile"), "{e:#}");
    }

    #[test]
    fn memory_budget_and_live_view_cap() {
        let c = Config::parse("").unwrap();
        assert_eq!((c.dicom.max_buffered_mb, c.http.max_sse_clients), (1024, 64));
        let e = Config::parse("[dicom]\nmax_message_mb = 64\nmax_buffered_mb = 100\n").unwrap_err();
        assert!(format!("{e:#}").contains("dicom.max_buffered_mb"), "{e:#}");
        assert!(Config::parse("[dicom]\nmax_message_mb = 64\nmax_buffered_mb = 128\n").is_ok());
        let e = Config::parse("[http]\nmax_sse_clients = 0\n").unwrap_err();
        assert!(format!("{e:#}").contains("http.max_sse_clients"), "{e:#}");
    }
}

#[cfg(test)]
mod example_file {
    /// The documented example file must parse and equal the embedded defaults.
    #[test]
    fn example_config_parses_to_defaults() {
        let text = include_str!("../systemd/lungsentry.toml");
        let c = super::Config::parse(text).unwrap();
        let d = super::Config::default();
        assert_eq!(toml::to_string(&c).unwrap(), toml::to_string(&d).unwrap());
    }
}

#[cfg(test)]
mod outputs_section {
    use super::{Config, ObjectKind};

    #[test]
    fn destinations_parse_and_bad_values_name_the_key() {
        let c = Config::parse(
            "[[outputs.dicom]]\nae_title = \"PACS\"\nhost = \"10.0.0.5\"\nport = 104\nobjects = [\"sr\", \"seg\"]\n",
        )
        .unwrap();
        assert_eq!(c.outputs.dicom[0].objects, vec![ObjectKind::Sr, ObjectKind::Seg]);
        assert_eq!(c.outputs.dicom[0].key(), "PACS@10.0.0.5:104");
        let c = Config::parse("[[outputs.dicom]]\nae_title = \"P\"\nhost = \"h\"\nport = 1\n").unwrap();
        assert_eq!(c.outputs.dicom[0].objects.len(), 3);
        let e = Config::parse("[[outputs.dicom]]\nae_title = \"P\"\nhost = \"h\"\nport = 1\nobjects = [\"rt\"]\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("rt"), "{e:#}");
        let e = Config::parse("[[outputs.dicom]]\nae_title = \"\"\nhost = \"h\"\nport = 1\n").unwrap_err();
        assert!(format!("{e:#}").contains("outputs.dicom[0].ae_title"), "{e:#}");
        let e = Config::parse("[outputs]\nmax_attempts = 0\n").unwrap_err();
        assert!(format!("{e:#}").contains("outputs.max_attempts"), "{e:#}");
    }
}
