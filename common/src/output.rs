//! Output formats for the CLIs: human tables by default, `-o json` / `-o yaml` for machines.
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
    Yaml,
}

impl FromStr for OutputFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" | "wide" => Ok(Self::Table),
            "json" => Ok(Self::Json),
            "yaml" => Ok(Self::Yaml),
            other => Err(format!("unknown output format {other:?}: use table, json or yaml")),
        }
    }
}

impl fmt::Display for OutputFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Table => "table",
            Self::Json => "json",
            Self::Yaml => "yaml",
        })
    }
}

/// Serialise `value` as JSON or YAML. Returns `None` for `Table` (the caller draws its own table).
pub fn render_structured<T: Serialize>(value: &T, format: OutputFormat) -> Option<String> {
    match format {
        OutputFormat::Table => None,
        OutputFormat::Json => Some(json_for_terminal(
            &serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        )),
        OutputFormat::Yaml => Some(serde_yaml::to_string(value).unwrap_or_else(|e| format!("error: {e}\n"))),
    }
}

/// serde_json escapes C0 controls but writes DEL and C1 controls (U+007F-U+009F, which some
/// terminals act on) as they are. They can only occur inside JSON strings, where `\u00XX` means
/// the same character: escape them, the document stays identical for programs.
pub fn json_for_terminal(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if ('\u{7f}'..='\u{9f}').contains(&c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

/// Multi-line text that may come from hosts, made safe for the operator's terminal.
pub fn term(s: &str) -> std::borrow::Cow<'_, str> {
    crate::redact::for_terminal(s, true)
}

/// A plain left-aligned table with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    use comfy_table::{presets::NOTHING, CellAlignment, ContentArrangement, Table};
    let mut t = Table::new();
    t.load_preset(NOTHING).set_content_arrangement(ContentArrangement::Disabled).set_header(headers.to_vec());
    for row in rows {
        // Cells carry text from hosts (hostnames, OS names, errors): no live control characters.
        t.add_row(
            row.iter()
                .take(headers.len())
                .map(|c| crate::redact::for_terminal(c, false).into_owned())
                .collect::<Vec<_>>(),
        );
    }
    // Three spaces between columns, none before the first: `NAME   STATUS`.
    let last = headers.len().saturating_sub(1);
    for (i, col) in t.column_iter_mut().enumerate() {
        col.set_padding((0, if i == last { 0 } else { 3 })).set_cell_alignment(CellAlignment::Left);
    }
    let mut out = String::new();
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_has_no_raw_control_characters_and_means_the_same() {
        let v = serde_json::json!({"hostname": "a\u{1b}[2J\u{9b}31m\u{7f}b"});
        let out = render_structured(&v, OutputFormat::Json).unwrap();
        assert!(!out.chars().any(|c| c.is_control() && c != '\n'), "{out:?}");
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["NAME", "X"], &[vec!["a".into(), "1".into()], vec!["long".into(), "2".into()]]);
        assert_eq!(t, "NAME   X\na      1\nlong   2\n");
    }

    #[test]
    fn formats_parse() {
        assert_eq!("json".parse::<OutputFormat>().unwrap(), OutputFormat::Json);
        assert!("xml".parse::<OutputFormat>().unwrap_err().contains("table, json or yaml"));
    }
}
