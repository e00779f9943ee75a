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
        OutputFormat::Json => {
            Some(serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")))
        }
        OutputFormat::Yaml => Some(serde_yaml::to_string(value).unwrap_or_else(|e| format!("error: {e}\n"))),
    }
}

/// A plain left-aligned table with a header row.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let mut parts = Vec::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                parts.push(c.to_string());
            } else {
                parts.push(format!("{:<w$}", c, w = widths[i]));
            }
        }
        out.push_str(parts.join("   ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(|s| s.as_str()).collect(), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

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
