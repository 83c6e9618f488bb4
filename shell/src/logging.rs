//! Log output of the binaries.

use std::io::IsTerminal;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::util::SubscriberInitExt;

/// The environment variable that chooses the log format when the command
/// line does not (`--log-format`).
pub const FORMAT_ENV: &str = "TETHER_LOG_FORMAT";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// One line of plain text per event, for people and journals.
    #[default]
    Text,
    /// One JSON object per line, for log collectors: the plain-words
    /// message is the `message` field, the event's fields sit next to it,
    /// with `timestamp`, `level` and `target`.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "{other:?} is not a log format: use \"text\" or \"json\""
            )),
        }
    }
}

/// Logs to standard error in `format`, at the level `RUST_LOG` names
/// (`info` when it is unset or unreadable). Colour only for text on a
/// terminal: a log redirected to a file or a journal gets plain text.
pub fn init(format: LogFormat) {
    match format {
        LogFormat::Text => text(std::io::stderr, std::io::stderr().is_terminal()).init(),
        LogFormat::Json => json(std::io::stderr).init(),
    }
}

/// Reports the error that ends a command: as a log event (`error`, the
/// plain words as its message) in JSON, so standard error stays one object
/// per line; else as `program: error` on standard error.
pub fn fatal(format: LogFormat, program: &str, error: &anyhow::Error) {
    match format {
        LogFormat::Text => eprintln!("{program}: {error:#}"),
        LogFormat::Json => tracing::error!("{error:#}"),
    }
}

fn filter() -> tracing_subscriber::EnvFilter {
    tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())
}

/// The text subscriber, writing to `writer`, with ANSI colour codes only
/// when `ansi`.
fn text<W>(writer: W, ansi: bool) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_ansi(ansi)
        .with_writer(writer)
        .finish()
}

/// The JSON subscriber, writing to `writer`: the event's fields (its
/// message among them) at the top level of each object.
fn json<W>(writer: W) -> impl tracing::Subscriber + Send + Sync
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_env_filter(filter())
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

    fn logged(subscriber: impl tracing::Subscriber + Send + Sync, buffer: &Buffer) -> String {
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(peer = "site-a", "something to see");
            tracing::info!("a second line");
        });
        let bytes = buffer.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn logged_text(ansi: bool) -> String {
        let buffer = Buffer::default();
        logged(text(buffer.clone(), ansi), &buffer)
    }

    #[test]
    fn json_is_one_object_per_line_with_the_message() {
        let buffer = Buffer::default();
        let out = logged(json(buffer.clone()), &buffer);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert_eq!(lines[0]["message"], "something to see", "{out}");
        assert_eq!(lines[0]["peer"], "site-a", "{out}");
        assert_eq!(lines[0]["level"], "WARN", "{out}");
        assert!(lines[0]["timestamp"].is_string(), "{out}");
        assert_eq!(lines[1]["message"], "a second line", "{out}");
        assert!(!out.contains('\u{1b}'), "{out:?}");
    }

    #[test]
    fn formats_parse_by_name() {
        assert_eq!("json".parse(), Ok(LogFormat::Json));
        assert_eq!("text".parse(), Ok(LogFormat::Text));
        let err = "yaml".parse::<LogFormat>().err().unwrap_or_default();
        assert!(err.contains("\"text\" or \"json\""), "{err}");
    }

    #[test]
    fn colour_only_when_asked() {
        let plain = logged_text(false);
        assert!(plain.contains("something to see"), "{plain}");
        assert!(!plain.contains('\u{1b}'), "{plain:?}");
        let coloured = logged_text(true);
        assert!(coloured.contains('\u{1b}'), "{coloured:?}");
    }
}
