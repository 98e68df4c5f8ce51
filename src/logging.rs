//! Logging: journald when it is there (every event field a journal field, PRIORITY from the level), stderr
//! otherwise.
//!
//! Owns: choosing the sink once at start, and the journald sink itself — a `tracing` layer that writes the
//! journal's native protocol (`KEY=value` lines, the length-prefixed binary form for values with a newline) as
//! one datagram per event to the journal socket, through a sealed memfd when the datagram is too large.
//! Fields are mapped here: `series = "ab12…"` becomes `SERIES=ab12…`, `decode_ms = 12.5` becomes
//! `DECODE_MS=12.5`; plus `MESSAGE`, `PRIORITY` (error 3, warn 4, info 6, debug/trace 7),
//! `SYSLOG_IDENTIFIER=lungsentry`, `TARGET`, `CODE_FILE`, `CODE_LINE`.
//! Hands on: nothing; events leave the process here.
//! Never logs PatientName/PatientID or raw UIDs: callers pass `patient_key` and the hashed series key.
//!
//! The journal is used when stderr is connected to it (`JOURNAL_STREAM` names stderr's device and inode, as under
//! systemd) or when `LUNGSENTRY_JOURNAL_SOCKET` names a socket to write to (a journald in a container at another
//! path; tests).
//!
//! Why this layer and not `tracing-journald` (tokio-rs/tracing; 0.3.2 read from its source): that crate
//! addresses every datagram, the memfd one included, with `send_to(payload, JOURNALD_PATH)` where
//! `JOURNALD_PATH` is the constant `"/run/systemd/journal/socket"` (`Layer::send_payload`,
//! `Layer::send_large_payload`), and `Layer::new()` fails unless something listens at that one path. It cannot be
//! pointed at `LUNGSENTRY_JOURNAL_SOCKET`, so `tests/journald.rs` (which binds its own socket: the test machines
//! have no journald) cannot be served. Measured with a probe program (tracing-journald 0.3.2, a datagram socket
//! bound in a temporary folder, nothing at the default path, `LUNGSENTRY_JOURNAL_SOCKET` set to it):
//! `tracing_journald::layer()` returned `No such file or directory (os error 2)` and the bound socket received
//! nothing. Smaller differences it would also bring: the `log` bridge's `log.target`/`log.module_path`/
//! `log.file`/`log.line` fields become extra `LOG_*` journal fields (we drop them), a field name starting with a
//! digit is passed on (journald drops such fields; we prefix `F`), `f64` fields are written with `Debug` (`1e-7`)
//! rather than `Display`, and an entry whose write fails is dropped silently (we write it to stderr). Field prefix (`with_field_prefix(None)`),
//! priority mapping (`with_priority_mappings`) and `with_syslog_identifier` would have served.
//! `systemd-journal-logger` is not used either: it only maps `log` key-values and cannot be pointed at another
//! socket; its one helper we used (`connected_to_journal`) is [`stderr_is_journal`] here.

use std::fmt::Write as _;
use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

/// journald's native protocol socket.
pub const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";
/// Environment variable naming another journal socket (and forcing the journal sink).
pub const JOURNAL_SOCKET_ENV: &str = "LUNGSENTRY_JOURNAL_SOCKET";
/// `SYSLOG_IDENTIFIER` of every entry.
pub const SYSLOG_IDENTIFIER: &str = "lungsentry";

/// Installs the logger: the journald layer when journald is reachable, else `tracing` to stderr.
/// `RUST_LOG` sets the filter (default info). `log` records of dependencies reach the same sink.
pub fn init() {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let socket = match std::env::var_os(JOURNAL_SOCKET_ENV) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ if stderr_is_journal() => Some(PathBuf::from(JOURNAL_SOCKET)),
        _ => None,
    };
    if let Some(path) = socket {
        match JournalLayer::new(&path) {
            Ok(layer) => {
                if tracing_subscriber::registry().with(filter()).with(layer).try_init().is_ok() {
                    return;
                }
            }
            Err(e) => eprintln!("lungsentry: journal socket {} not usable ({e}); logging to stderr", path.display()),
        }
    }
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter()).try_init();
}

/// Whether stderr is the journal's stream (systemd sets `JOURNAL_STREAM=<device>:<inode>` of the stream it
/// connects stdout/stderr to; a redirected stderr no longer matches, and then the journal socket is not used).
pub fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    std::env::var_os("JOURNAL_STREAM").is_some_and(|want| is_stream(&want, std::io::stderr().as_fd()))
}

/// Whether `fd` is the file `journal_stream` (`<device>:<inode>`, decimal) names.
fn is_stream(journal_stream: &std::ffi::OsStr, fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(fd) = fd.try_clone_to_owned() else { return false };
    match std::fs::File::from(fd).metadata() {
        Ok(m) => journal_stream.to_string_lossy() == format!("{}:{}", m.dev(), m.ino()),
        Err(_) => false,
    }
}

/// journald PRIORITY of a level (syslog numbering).
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// A `tracing` field name as a journal field name: upper case, `[A-Z0-9_]` only, not starting with `_` or a
/// digit (those are reserved or invalid), at most 64 bytes.
pub fn journal_field_name(name: &str) -> String {
    let mut out: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    if out.starts_with(|c: char| c == '_' || c.is_ascii_digit()) || out.is_empty() {
        out.insert(0, 'F');
    }
    out.truncate(64);
    out
}

/// Appends one field in the native protocol: `KEY=value\n`, or `KEY\n<u64 LE length><value>\n` when the value
/// holds a newline.
pub fn put_field(buf: &mut Vec<u8>, key: &str, value: &[u8]) {
    buf.extend_from_slice(key.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

/// The journald sink: one native-protocol datagram per event.
pub struct JournalLayer {
    socket: UnixDatagram,
    path: PathBuf,
}

impl JournalLayer {
    /// Connects (unbound datagram socket) to the journal socket at `path`; fails when nothing listens there.
    pub fn new(path: &Path) -> io::Result<JournalLayer> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(JournalLayer { socket, path: path.to_path_buf() })
    }

    /// The payload of one event.
    fn payload(event: &Event<'_>) -> Vec<u8> {
        let meta = event.metadata();
        let mut v = FieldVisitor::default();
        event.record(&mut v);
        let mut buf = Vec::with_capacity(256);
        put_field(&mut buf, "PRIORITY", priority(meta.level()).to_string().as_bytes());
        put_field(&mut buf, "SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER.as_bytes());
        put_field(&mut buf, "MESSAGE", v.message.as_bytes());
        put_field(&mut buf, "TARGET", meta.target().as_bytes());
        if let Some(f) = meta.file() {
            put_field(&mut buf, "CODE_FILE", f.as_bytes());
        }
        if let Some(l) = meta.line() {
            put_field(&mut buf, "CODE_LINE", l.to_string().as_bytes());
        }
        for (k, val) in &v.fields {
            put_field(&mut buf, k, val.as_bytes());
        }
        buf
    }

    fn send(&self, payload: &[u8]) -> io::Result<()> {
        match self.socket.send(payload) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMSGSIZE) | Some(libc::ENOBUFS)) => {
                send_via_memfd(&self.socket, payload)
            }
            Err(e) => Err(e),
        }
    }
}

impl<S: Subscriber> tracing_subscriber::Layer<S> for JournalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let payload = Self::payload(event);
        if let Err(e) = self.send(&payload) {
            // journald gone (restart) or refusing: the entry still goes somewhere a person can see.
            let text = String::from_utf8_lossy(&payload).replace('\n', " ");
            eprintln!("lungsentry: journal {} write failed ({e}): {text}", self.path.display());
        }
    }
}

/// Collects the message and every other field of an event as journal (name, value) pairs.
#[derive(Default)]
struct FieldVisitor {
    message: String,
    fields: Vec<(String, String)>,
}

impl FieldVisitor {
    fn put(&mut self, field: &Field, value: String) {
        // `log` records bridged into tracing carry their origin as `log.*` fields: keep them out.
        if field.name() == "message" {
            self.message = value;
        } else if !field.name().starts_with("log.") {
            self.fields.push((journal_field_name(field.name()), value));
        }
    }
}

impl Visit for FieldVisitor {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.put(field, s);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.to_string());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.to_string());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.to_string());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.to_string());
    }
}

/// Large entries: the payload in a sealed memfd whose descriptor is passed over the socket (journald's protocol).
fn send_via_memfd(socket: &UnixDatagram, payload: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: the name is a NUL-terminated C string literal and the flags are valid; memfd_create only creates a
    // new descriptor, which we check and then own.
    let raw =
        unsafe { libc::memfd_create(c"lungsentry-journal".as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh, valid descriptor nothing else owns; `OwnedFd` closes it exactly once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = std::fs::File::from(fd);
    file.write_all(payload)?;
    // SAFETY: F_ADD_SEALS on a descriptor we own (open for the whole call) with valid seal flags; no memory is
    // passed.
    let sealed = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL,
        )
    };
    if sealed < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd_bytes = std::mem::size_of::<libc::c_int>() as u32;
    // SAFETY: CMSG_SPACE and CMSG_LEN are pure size computations (libc declares them unsafe only for being C
    // macros).
    let (space, cmsg_len) = unsafe { (libc::CMSG_SPACE(fd_bytes) as usize, libc::CMSG_LEN(fd_bytes)) };
    // Control buffer aligned for `cmsghdr` (u64 alignment ≥ its alignment on Linux): room for one header and one
    // descriptor (CMSG_SPACE(4) is 24 bytes on 64-bit, 16 on 32-bit).
    let mut control = [0u64; 4];
    assert!(space <= std::mem::size_of_val(&control), "CMSG_SPACE({fd_bytes}) = {space}");
    // SAFETY: msghdr is a plain C struct (integers and raw pointers) for which all-zero bytes are valid: no name,
    // no data iovecs, no control until set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` points at `control`, which outlives this block, is aligned for cmsghdr and holds `space`
    // bytes ≥ one header, so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for one c_int (written unaligned
    // as the macro's pointer need not be aligned for c_int).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = cmsg_len as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), file.as_raw_fd());
    }
    // SAFETY: a connected socket we borrow for the call and a fully initialised msghdr whose control buffer
    // (`control`) and the descriptor in it (`file`) are alive until sendmsg returns; no data iovecs.
    if unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_follow_journald_rules() {
        assert_eq!(journal_field_name("series"), "SERIES");
        assert_eq!(journal_field_name("decode_ms"), "DECODE_MS");
        assert_eq!(journal_field_name("_secret"), "F_SECRET");
        assert_eq!(journal_field_name("log.target"), "LOG_TARGET");
        assert_eq!(journal_field_name("9x"), "F9X");
    }

    #[test]
    fn journal_stream_must_name_the_descriptor() {
        use std::os::fd::AsFd;
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::tempfile().unwrap();
        let other = tempfile::tempfile().unwrap();
        let m = f.metadata().unwrap();
        let id = format!("{}:{}", m.dev(), m.ino());
        assert!(is_stream(id.as_ref(), f.as_fd()));
        assert!(!is_stream(id.as_ref(), other.as_fd()));
        assert!(!is_stream("".as_ref(), f.as_fd()));
        assert!(!is_stream(format!("{}:{}", m.dev(), m.ino() + 1).as_ref(), f.as_fd()));
    }

    /// The large-entry path: the receiver gets one descriptor (SCM_RIGHTS), sealed, holding exactly the payload.
    #[test]
    fn large_entries_travel_in_a_sealed_memfd() {
        use std::io::{Read, Seek};
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let (tx, rx) = UnixDatagram::pair().unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        send_via_memfd(&tx, &payload).unwrap();

        let mut data = [0u8; 16];
        let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
        let mut control = [0u64; 8];
        // SAFETY: msghdr is a plain C struct for which all-zero bytes are valid.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: every pointer in `msg` points at a live, writable buffer of the stated length.
        let n = unsafe { libc::recvmsg(rx.as_raw_fd(), &mut msg, 0) };
        assert_eq!(n, 0, "no data bytes, only the descriptor");
        assert_eq!(msg.msg_flags & libc::MSG_CTRUNC, 0);
        // SAFETY: recvmsg filled `control` (aligned for cmsghdr) and set msg_controllen; CMSG_FIRSTHDR checks it.
        let raw = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            assert!(!cmsg.is_null());
            assert_eq!(((*cmsg).cmsg_level, (*cmsg).cmsg_type), (libc::SOL_SOCKET, libc::SCM_RIGHTS));
            std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>())
        };
        // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor of this process that nothing else owns.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        // SAFETY: F_GET_SEALS on a descriptor we own; no memory is passed.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "seals {seals:#x}");
        file.rewind().unwrap();
        let mut got = Vec::new();
        file.read_to_end(&mut got).unwrap();
        assert!(got == payload, "memfd holds {} bytes, not the {}-byte payload", got.len(), payload.len());
    }

    #[test]
    fn multi_line_values_use_the_binary_form() {
        let mut b = Vec::new();
        put_field(&mut b, "A", b"one");
        put_field(&mut b, "B", b"x\ny");
        let mut want = b"A=one\nB\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"x\ny\n");
        assert_eq!(b, want);
    }
}
