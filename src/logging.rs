//! Logging: journald when it is there (structured fields, PRIORITY from the level), stderr otherwise.
//!
//! Owns: choosing the sink once at start. Never logs PatientName/PatientID: callers pass `patient_key`.

/// Installs the logger: systemd-journal-logger when journald is reachable, else `tracing` to stderr.
/// `RUST_LOG` sets the level (default info).
pub fn init() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Info);
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            if logger.with_syslog_identifier("lungsentry".into()).install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level.to_string().to_lowercase())),
        )
        .try_init();
}
