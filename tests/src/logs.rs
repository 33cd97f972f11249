//! Capturing this process's tracing output, for the canary case's scan of log lines.

use std::io;
use std::sync::{Arc, Mutex, OnceLock};

use tracing_subscriber::fmt::format::FmtSpan;

/// Everything written by the process-wide DEBUG subscriber that [`capture`] installs.
#[derive(Debug, Clone)]
pub struct LogCapture {
    buf: Arc<Mutex<Vec<u8>>>,
}

impl LogCapture {
    /// Every captured byte so far, as text.
    pub fn contents(&self) -> String {
        let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// Whether `needle` appears anywhere in the captured bytes.
    pub fn contains(&self, needle: &[u8]) -> bool {
        let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        find(&buf, needle)
    }
}

struct BufWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for BufWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Installs (once per process) a global DEBUG subscriber writing every event and span
/// open/close, with fields, into a buffer, and returns that buffer.
///
/// Global rather than thread-local, because the engine's actors run as spawned tasks on any
/// worker thread. Fails if the test binary already installed another global subscriber.
pub fn capture() -> Result<LogCapture, String> {
    static CAPTURE: OnceLock<Result<LogCapture, String>> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let writer = buf.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_target(true)
                .with_span_events(FmtSpan::NEW | FmtSpan::CLOSE)
                .with_writer(move || BufWriter(writer.clone()))
                .finish();
            tracing::subscriber::set_global_default(subscriber).map_err(|e| {
                format!(
                    "cannot capture logs: another global tracing subscriber is installed in this \
                     test binary ({e})"
                )
            })?;
            Ok(LogCapture { buf })
        })
        .clone()
}

/// Whether `needle` occurs in `haystack` (an empty needle always does).
pub fn find(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}
