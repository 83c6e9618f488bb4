//! Log output of the binaries.

use std::io::IsTerminal;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// Logs to standard error, at the level `RUST_LOG` names (`info` when it is
/// unset or unreadable). Colour only when standard error is a terminal: a
/// log redirected to a file or a journal gets plain text.
pub fn init() {
    subscriber(std::io::stderr, std::io::stderr().is_terminal()).init();
}

/// The subscriber `init` installs, writing to `writer`, with ANSI colour
/// codes only when `ansi`.
fn subscriber<W>(writer: W, ansi: bool) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(ansi)
        .with_writer(writer)
        .finish()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut b) = self.0.lock() {
                b.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buffer {
        type Writer = Buffer;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn logged(ansi: bool) -> String {
        let buffer = Buffer::default();
        tracing::subscriber::with_default(subscriber(buffer.clone(), ansi), || {
            tracing::warn!(peer = "site-a", "something to see");
        });
        let bytes = buffer.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn colour_only_when_asked() {
        let plain = logged(false);
        assert!(plain.contains("something to see"), "{plain}");
        assert!(!plain.contains('\u{1b}'), "{plain:?}");
        let coloured = logged(true);
        assert!(coloured.contains('\u{1b}'), "{coloured:?}");
    }
}
