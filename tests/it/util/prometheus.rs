//! A strict parser of the Prometheus / OpenMetrics text format, enough to check that
//! `/metrics` is well-formed and to read values from it.

use std::collections::{BTreeMap, BTreeSet};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name (with `_total`, `_bucket`, … suffixes).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .ok_or(format!("bad label in {text}"))?;
        if !is_name(key) {
            return Err(format!("bad label name {key}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err("dangling escape".into()),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => return Err(format!("unterminated label value in {text}")),
            }
        };
        labels.insert(key.to_string(), value);
        rest = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    Ok(labels)
}

/// Parses `text`; every sample must belong to a family declared with `# TYPE`.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut families = BTreeSet::new();
    let mut samples = Vec::new();
    let mut saw_eof = false;
    for line in text.lines() {
        if saw_eof {
            return Err(format!("line after # EOF: {line}"));
        }
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            match (parts.next(), parts.next()) {
                (Some("TYPE"), Some(name)) => {
                    let kind = parts.next().unwrap_or("");
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "info",
                        "unknown",
                        "stateset",
                        "gaugehistogram",
                    ]
                    .contains(&kind)
                    {
                        return Err(format!("bad type {kind}"));
                    }
                    families.insert(name.to_string());
                }
                (Some("HELP" | "UNIT"), Some(_)) => {}
                _ => return Err(format!("bad comment: {line}")),
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').ok_or(format!("no value: {line}"))?;
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (
                name,
                parse_labels(
                    labels
                        .strip_suffix('}')
                        .ok_or(format!("unclosed labels: {line}"))?,
                )?,
            ),
            None => (series, BTreeMap::new()),
        };
        if !is_name(name) {
            return Err(format!("bad metric name: {name}"));
        }
        let family_known = families.iter().any(|f| {
            name == f
                || ["_total", "_bucket", "_sum", "_count", "_created", "_info"]
                    .iter()
                    .any(|s| name.strip_suffix(s) == Some(f))
        });
        if !family_known {
            return Err(format!("sample {name} has no # TYPE"));
        }
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().map_err(|_| format!("bad value: {line}"))?,
        };
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    if !saw_eof {
        return Err("no # EOF".into());
    }
    Ok(samples)
}

/// The value of `name` with exactly `labels`.
pub fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == labels)
        .map(|s| s.value)
}
