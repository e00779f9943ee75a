//! Logging: the systemd journal (through `systemd-journal-logger`) when running under systemd,
//! stderr otherwise. Code logs with `tracing`; under systemd a small layer turns every event into
//! a journal entry with `SYSLOG_IDENTIFIER`, the priority of its level, a readable `MESSAGE`
//! (the text and its fields), and every field as a structured journal field (`TASK=`, `NODE=`,
//! `SESSION=`, ...: visible with `journalctl -o verbose` and usable in `journalctl TASK=...`).
//! Fields of the enclosing spans and process-wide fields ([`set_field`]) are added too.
use std::fmt::Write as _;
use std::sync::RwLock;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Fields added to every entry (e.g. the agent's node name once it is known).
static PROCESS_FIELDS: RwLock<Vec<(String, String)>> = RwLock::new(Vec::new());

/// True when stderr is connected to the journal (systemd sets `JOURNAL_STREAM` for services).
pub fn under_systemd() -> bool {
    systemd_journal_logger::connected_to_journal()
        || std::env::var_os("JOURNAL_STREAM").is_some()
        || std::env::var_os("INVOCATION_ID").is_some()
}

/// Add (or replace) a field on every later journal entry, e.g. `set_field("node", "h1")`.
pub fn set_field(key: &str, value: &str) {
    if let Ok(mut f) = PROCESS_FIELDS.write() {
        f.retain(|(k, _)| k != key);
        f.push((key.to_string(), value.to_string()));
    }
}

/// Initialise `tracing`. `default_level` applies unless `RUST_LOG` says otherwise;
/// `identifier` becomes `SYSLOG_IDENTIFIER` in the journal.
pub fn init(default_level: &str, identifier: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    if under_systemd() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let layer = JournalLayer { journal: journal.with_syslog_identifier(identifier.to_string()) };
            let _ = tracing_subscriber::registry().with(filter).with(layer).try_init();
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The message and the fields of an event or span.
#[derive(Default)]
struct Fields {
    message: String,
    fields: Vec<(String, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.fields.push((field.name().to_string(), value));
        }
    }
}

/// Span fields, kept in the span's extensions.
struct SpanFields(Vec<(String, String)>);

struct JournalLayer {
    journal: systemd_journal_logger::JournalLog,
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for JournalLayer {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, id: &tracing::span::Id, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        attrs.record(&mut f);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(f.fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let mut all: Vec<(String, String)> = PROCESS_FIELDS.read().map(|g| g.clone()).unwrap_or_default();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(sf) = span.extensions().get::<SpanFields>() {
                    all.extend(sf.0.iter().cloned());
                }
            }
        }
        all.extend(f.fields.iter().cloned());
        // The readable line keeps the event's own fields (an error hidden in a field would be
        // invisible in plain `journalctl` output).
        let mut message = f.message;
        for (k, v) in &f.fields {
            let _ = write!(message, " {k}={v}");
        }
        let meta = event.metadata();
        let level = match *meta.level() {
            tracing::Level::ERROR => log::Level::Error,
            tracing::Level::WARN => log::Level::Warn,
            tracing::Level::INFO => log::Level::Info,
            tracing::Level::DEBUG => log::Level::Debug,
            tracing::Level::TRACE => log::Level::Trace,
        };
        let kvs: Vec<(&str, &str)> = all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let kvs: &[(&str, &str)] = &kvs;
        log::Log::log(
            &self.journal,
            &log::Record::builder()
                .args(format_args!("{message}"))
                .level(level)
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kvs)
                .build(),
        );
    }
}
