//! drover's own log (what it says about itself, on stderr, which is
//! state_dir/drover.log under `start --detach`). A line that cannot be
//! written (a closed pipe, a full disk) is lost; the supervisor never is.
//! Text lines are logfmt-like: `message key=value …`, a value quoted only
//! when it holds a space, a quote, `=` or a control character, and an
//! absent value (`None`) not printed at all.

use std::fmt::{self, Write as _};
use std::io::{self, IsTerminal, Write};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

use crate::cli::LogFormat;

/// Sets up drover's own log on stderr; `DROVER_LOG` filters it (default
/// `info`). Colours only when stderr is a terminal.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LossyStderr)
        // Its own report of a failed write is an `eprintln!`, which panics
        // when stderr is the thing that failed.
        .log_internal_errors(false)
        .with_target(false)
        .with_ansi(io::stderr().is_terminal());
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.fmt_fields(Logfmt).try_init(),
    };
}

/// stderr, whose write errors are dropped: each event is one write, so
/// a failure loses that line and nothing else.
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The text format's fields: see the module comment.
pub struct Logfmt;

impl<'w> FormatFields<'w> for Logfmt {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Visitor { out: writer, first: true, result: Ok(()) };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'w> {
    out: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    fn put(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        self.result = if field.name() == "message" {
            write!(self.out, "{sep}{value}")
        } else {
            write!(self.out, "{sep}{}=", field.name()).and_then(|()| write_value(&mut self.out, value))
        };
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let mut s = String::new();
        let _ = write!(s, "{value:?}");
        self.put(field, &s);
    }
}

/// `value` as is, or quoted (with Rust's escapes) when it would not read
/// back as one value.
fn write_value(out: &mut impl fmt::Write, value: &str) -> fmt::Result {
    let plain = !value.is_empty()
        && !value.chars().any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=');
    if plain { out.write_str(value) } else { write!(out, "{value:?}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(v: &str) -> String {
        let mut s = String::new();
        write_value(&mut s, v).unwrap();
        s
    }

    #[test]
    fn values_are_quoted_only_when_needed() {
        assert_eq!(shown("web"), "web");
        assert_eq!(shown("/tmp/x.log"), "/tmp/x.log");
        assert_eq!(shown("exit 1"), "\"exit 1\"");
        assert_eq!(shown(""), "\"\"");
        assert_eq!(shown("a=b"), "\"a=b\"");
        assert_eq!(shown("say \"hi\"\n"), "\"say \\\"hi\\\"\\n\"");
    }
}
