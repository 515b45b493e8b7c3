//! Results: the human table on stdout, the JSON file (figures + environment + flags), and
//! `wse-bench compare a.json b.json`.
//!
//! Figures are named with their unit (`latency_p99_ms`, `handshakes_per_s`) so a JSON file
//! reads on its own, and kept in insertion order so tables read top-down.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::stats::{Latency, LatencySummary};
use crate::sys::Environment;

/// Everything one scenario run produced.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    /// True when the run was cut short (Ctrl-C, deadline): figures are partial.
    pub partial: bool,
    /// The headline figures, in display order.
    pub results: IndexMap<String, Value>,
    /// Per-step figures (the rate search), when the scenario has steps.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<IndexMap<String, Value>>,
    /// Warnings a reader must see next to the figures (saturation, limits, errors).
    pub notes: Vec<String>,
    /// Whole latency histograms by figure prefix (HdrHistogram V2, deflated, base64), so
    /// `report --html` can plot every percentile, not just the summary figures.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub histograms: IndexMap<String, String>,
    pub environment: Value,
    /// The flags, parsed, and the raw command line.
    pub args: Value,
}

impl Report {
    pub fn new(scenario: &str, env: Environment) -> Self {
        Self {
            scenario: scenario.to_owned(),
            partial: false,
            results: IndexMap::new(),
            steps: Vec::new(),
            notes: Vec::new(),
            histograms: IndexMap::new(),
            environment: serde_json::to_value(env).unwrap_or(Value::Null),
            args: Value::Null,
        }
    }

    /// Sets a figure (replacing an earlier value of the same name in place).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.results.insert(key.to_owned(), value.into());
    }

    /// Sets `<prefix>_{count,mean,p50,p90,p99,p999,max}_ms`.
    pub fn latency(&mut self, prefix: &str, s: &LatencySummary) {
        self.set(&format!("{prefix}_count"), s.count);
        self.set(&format!("{prefix}_mean_ms"), s.mean_ms);
        self.set(&format!("{prefix}_p50_ms"), s.p50_ms);
        self.set(&format!("{prefix}_p90_ms"), s.p90_ms);
        self.set(&format!("{prefix}_p99_ms"), s.p99_ms);
        self.set(&format!("{prefix}_p999_ms"), s.p999_ms);
        self.set(&format!("{prefix}_max_ms"), s.max_ms);
    }

    /// Keeps the whole histogram behind the `<prefix>_*_ms` figures (nothing when empty).
    pub fn histogram(&mut self, prefix: &str, h: &Latency) {
        if h.count() > 0 {
            self.histograms.insert(prefix.to_owned(), h.encode());
        }
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The figure `key` as a number, when present and numeric.
    pub fn number(&self, key: &str) -> Option<f64> {
        self.results.get(key).and_then(Value::as_f64)
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let partial = if self.partial { " (PARTIAL)" } else { "" };
        let _ = writeln!(out, "== {}{partial} ==", self.scenario);
        let width = self.results.keys().map(String::len).max().unwrap_or(0);
        for (k, v) in &self.results {
            let _ = writeln!(out, "  {k:<width$}  {}", fmt_value(v));
        }
        if !self.steps.is_empty() {
            let _ = writeln!(out, "  steps:");
            for step in &self.steps {
                let line: Vec<String> = step
                    .iter()
                    .map(|(k, v)| format!("{k}={}", fmt_value(v)))
                    .collect();
                let _ = writeln!(out, "    {}", line.join(" "));
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "  NOTE: {n}");
        }
        out
    }

    /// Writes the JSON file.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self).expect("reports serialise");
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))
    }

    /// Reads a JSON file written by [`Report::write_json`].
    ///
    /// # Errors
    /// Unreadable or not a report.
    pub fn read_json(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// Numbers with 3 decimals (integers as integers), strings as they are.
fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        Value::Number(n) => fmt_f64(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn fmt_f64(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else if x != 0.0 && x.abs() < 0.001 {
        format!("{x:.3e}")
    } else {
        format!("{x:.3}")
    }
}

/// The side-by-side table of two reports: every numeric figure of `a` that `b` also has, with
/// the ratio b/a.
pub fn compare(a: &Report, b: &Report, a_name: &str, b_name: &str) -> String {
    let mut out = String::new();
    // `floor` is `fanout` against a minimal sender: the same figures, meant to be compared.
    let kind = |s: &str| {
        if s == "floor" {
            "fanout".to_owned()
        } else {
            s.to_owned()
        }
    };
    if kind(&a.scenario) != kind(&b.scenario) {
        let _ = writeln!(
            out,
            "NOTE: comparing different scenarios ({} vs {})",
            a.scenario, b.scenario
        );
    }
    let _ = writeln!(out, "== compare {}: b/a ==", a.scenario);
    let width = a.results.keys().map(String::len).max().unwrap_or(6).max(6);
    let _ = writeln!(
        out,
        "  {:<width$}  {:>14}  {:>14}  {:>9}",
        "figure", a_name, b_name, "b/a"
    );
    for (k, va) in &a.results {
        let (Some(x), Some(y)) = (va.as_f64(), b.results.get(k).and_then(Value::as_f64)) else {
            continue;
        };
        let ratio = if x == 0.0 {
            "-".to_owned()
        } else {
            format!("{:.3}", y / x)
        };
        let _ = writeln!(
            out,
            "  {k:<width$}  {:>14}  {:>14}  {ratio:>9}",
            fmt_f64(x),
            fmt_f64(y)
        );
    }
    for (name, r) in [(a_name, a), (b_name, b)] {
        if r.partial {
            let _ = writeln!(out, "  NOTE: {name} is a partial run");
        }
        for n in &r.notes {
            let _ = writeln!(out, "  NOTE ({name}): {n}");
        }
    }
    out
}

/// One report whose every numeric figure is the median over `runs` (repeats of the same
/// scenario), so published figures are not one lucky or unlucky run on a noisy machine.
/// Figures missing from some run are left out; notes are kept with their run number.
///
/// # Panics
/// When `runs` is empty.
pub fn median(runs: &[Report]) -> Report {
    let first = runs.first().expect("median of no runs");
    let mut out = first.clone();
    out.steps.clear();
    out.notes.clear();
    // A median has no histogram of its own (the plots fall back to the median percentiles).
    out.histograms.clear();
    out.partial = runs.iter().any(|r| r.partial);
    out.results.retain(|k, v| {
        let mut xs: Vec<f64> = runs
            .iter()
            .filter_map(|r| r.results.get(k).and_then(Value::as_f64))
            .collect();
        if !v.is_number() {
            return true;
        }
        if xs.len() != runs.len() {
            return false;
        }
        xs.sort_by(f64::total_cmp);
        let mid = xs.len() / 2;
        let m = if xs.len() % 2 == 1 {
            xs[mid]
        } else {
            (xs[mid - 1] + xs[mid]) / 2.0
        };
        *v = Value::from(m);
        true
    });
    out.set("runs", runs.len());
    // A note every run made is said once; the others say which run they come from.
    for (i, r) in runs.iter().enumerate() {
        for n in &r.notes {
            if runs.iter().all(|o| o.notes.contains(n)) {
                if i == 0 {
                    out.notes.push(n.clone());
                }
            } else {
                out.notes.push(format!("run {}: {n}", i + 1));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(pairs: &[(&str, f64)]) -> Report {
        let mut r = Report::new("fanout", Environment::read(1024));
        for (k, v) in pairs {
            r.set(k, *v);
        }
        r
    }

    #[test]
    fn json_round_trip_keeps_order() {
        let mut r = report(&[("zeta", 1.0), ("alpha", 2.5)]);
        r.note("hello");
        let path = std::env::temp_dir().join(format!("wse-bench-test-{}.json", std::process::id()));
        r.write_json(&path).unwrap();
        let back = Report::read_json(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.results.keys().collect::<Vec<_>>(), ["zeta", "alpha"]);
        assert_eq!(back.notes, ["hello"]);
        assert!(r.table().contains("zeta"));
    }

    #[test]
    fn median_per_figure() {
        let runs = [
            report(&[("x", 3.0), ("y", 10.0)]),
            report(&[("x", 1.0)]),
            report(&[("x", 2.0), ("y", 30.0)]),
        ];
        let m = median(&runs);
        assert_eq!(m.number("x"), Some(2.0));
        assert_eq!(m.number("y"), None);
        assert_eq!(m.number("runs"), Some(3.0));
        let m = median(&runs[..2]);
        assert_eq!(m.number("x"), Some(2.0));
        let mut noted = runs.clone();
        for r in &mut noted {
            r.note("everywhere");
        }
        noted[1].note("once");
        assert_eq!(median(&noted).notes, ["everywhere", "run 2: once"]);
    }

    #[test]
    fn compare_prints_ratios() {
        let a = report(&[("deliveries_per_s", 1000.0), ("only_a", 1.0)]);
        let b = report(&[("deliveries_per_s", 2500.0)]);
        let t = compare(&a, &b, "a", "b");
        assert!(t.contains("2.500"), "{t}");
        assert!(!t.contains("only_a"), "{t}");
    }
}
