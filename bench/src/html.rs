//! `wse-bench report *.json --html report.html`: one self-contained HTML page — inline CSS and
//! SVG, no scripts, no external assets — so it can be attached to an issue or archived.
//!
//! Results are grouped by scenario. Each group has:
//! - a latency percentile plot per latency figure (`<prefix>_p50_ms` ...), one line per result:
//!   the whole curve from the histogram when the JSON carries it, else the summary percentiles
//!   (p50, p90, p99, p99.9, max) — e.g. for medians of repeats;
//! - bars for every throughput figure (`*_per_s`), one per result;
//! - the table of every figure side by side (with b/a ratios for two results), the rate-search
//!   steps, and the notes.
//!
//! The x axis of percentile plots is logarithmic in 1/(1-q), the usual HdrHistogram view: equal
//! space for 50→90, 90→99, 99→99.9 %.

use std::fmt::Write as _;

use indexmap::IndexMap;
use serde_json::Value;

use crate::report::Report;
use crate::stats::Latency;

/// Line and bar colours, in result order (distinguishable, also in grey print).
const PALETTE: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
/// Plot geometry, pixels.
const W: f64 = 640.0;
const H: f64 = 300.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 40.0;
/// Percentile axis: log10(1/(1-q)) from 0 (q=0) to 5 (99.999 %), max drawn one step further.
const X_NINES: f64 = 5.0;
const X_MAX_SLOT: f64 = 5.6;
/// Summary percentiles every result has: (figure suffix, quantile).
const SUMMARY: [(&str, f64); 4] = [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999)];

/// Renders `reports` (each with the name it is shown under, e.g. its file stem).
pub fn render(reports: &[(String, Report)]) -> String {
    let mut out = String::with_capacity(64 * 1024);
    out.push_str(HEAD);
    let _ = writeln!(
        out,
        "<h1>wse-bench report</h1>\n<p class=\"meta\">{} result{}: {}</p>",
        reports.len(),
        if reports.len() == 1 { "" } else { "s" },
        esc(&reports
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "))
    );
    let mut groups: IndexMap<&str, Vec<(usize, &String, &Report)>> = IndexMap::new();
    for (i, (name, r)) in reports.iter().enumerate() {
        groups
            .entry(r.scenario.as_str())
            .or_default()
            .push((i, name, r));
    }
    for (scenario, runs) in &groups {
        let _ = writeln!(out, "<section>\n<h2>{}</h2>", esc(scenario));
        environment(&mut out, runs);
        legend(&mut out, runs);
        for prefix in latency_prefixes(runs) {
            percentile_plot(&mut out, &prefix, runs);
        }
        for key in throughput_keys(runs) {
            bars(&mut out, &key, runs);
        }
        figures_table(&mut out, runs);
        steps(&mut out, runs);
        notes(&mut out, runs);
        out.push_str("</section>\n");
    }
    out.push_str("</body>\n</html>\n");
    out
}

const HEAD: &str = r#"<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>wse-bench report</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-bottom: 4px; }
h3 { font-size: 15px; margin: 18px 0 4px; }
.meta, .env { color: #555; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; } td.k, th.k { text-align: left; font-family: ui-monospace, monospace; }
.partial { color: #b00; font-weight: bold; }
.legend span { display: inline-block; margin-right: 16px; }
.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -1px; }
svg text { font: 11px system-ui, sans-serif; fill: #333; }
ul.notes { color: #555; }
</style>
</head>
<body>
"#;

fn colour(i: usize) -> &'static str {
    PALETTE[i % PALETTE.len()]
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

type Runs<'a> = [(usize, &'a String, &'a Report)];

fn environment(out: &mut String, runs: &Runs) {
    for (_, name, r) in runs {
        let env = &r.environment;
        let s = |k: &str| env.get(k).map_or_else(String::new, fmt_value);
        let target = r.results.get("target").map(fmt_value).unwrap_or_default();
        let _ = writeln!(
            out,
            "<p class=\"env\"><b>{}</b>{}: target {}, {} ({} of {} cores usable), kernel {}, RLIMIT_NOFILE {}</p>",
            esc(name),
            if r.partial {
                " <span class=\"partial\">PARTIAL</span>"
            } else {
                ""
            },
            esc(&target),
            esc(&s("cpu_model")),
            esc(&s("cores_usable")),
            esc(&s("cores_online")),
            esc(&s("kernel")),
            esc(&s("nofile_limit")),
        );
    }
}

fn legend(out: &mut String, runs: &Runs) {
    out.push_str("<p class=\"legend\">");
    for (i, name, _) in runs {
        let _ = write!(
            out,
            "<span><span class=\"swatch\" style=\"background:{}\"></span>{}</span>",
            colour(*i),
            esc(name)
        );
    }
    out.push_str("</p>\n");
}

/// Prefixes of `<prefix>_p50_ms` figures, in order of appearance.
fn latency_prefixes(runs: &Runs) -> Vec<String> {
    let mut seen = Vec::new();
    for (_, _, r) in runs {
        for k in r.results.keys() {
            if let Some(p) = k.strip_suffix("_p50_ms")
                && !seen.iter().any(|s: &String| s == p)
            {
                seen.push(p.to_owned());
            }
        }
    }
    seen
}

/// `*_per_s` figures, in order of appearance.
fn throughput_keys(runs: &Runs) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    for (_, _, r) in runs {
        for (k, v) in &r.results {
            if k.ends_with("_per_s") && v.is_number() && !seen.contains(k) {
                seen.push(k.clone());
            }
        }
    }
    seen
}

/// The plotted points of one result: (x on the percentile axis, milliseconds).
fn curve(r: &Report, prefix: &str) -> Vec<(f64, f64)> {
    let x = |q: f64| (1.0 / (1.0 - q)).log10();
    if let Some(h) = r
        .histograms
        .get(prefix)
        .and_then(|t| Latency::decode(t).ok())
        && h.count() > 0
    {
        let mut pts: Vec<(f64, f64)> = (0..=(X_NINES * 10.0) as u32)
            .map(|i| {
                let nines = f64::from(i) / 10.0;
                let q = 1.0 - 10f64.powf(-nines);
                (nines, h.value_at_quantile(q) as f64 / 1e6)
            })
            .collect();
        pts.push((X_MAX_SLOT, h.value_at_quantile(1.0) as f64 / 1e6));
        return pts;
    }
    let mut pts: Vec<(f64, f64)> = SUMMARY
        .iter()
        .filter_map(|(s, q)| Some((x(*q), r.number(&format!("{prefix}_{s}_ms"))?)))
        .collect();
    if let Some(max) = r.number(&format!("{prefix}_max_ms")) {
        pts.push((X_MAX_SLOT, max));
    }
    pts
}

/// A round axis top and tick step for values up to `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_tick(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e12 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn percentile_plot(out: &mut String, prefix: &str, runs: &Runs) {
    let curves: Vec<(usize, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|(i, _, r)| (*i, curve(r, prefix)))
        .filter(|(_, c)| !c.is_empty())
        .collect();
    if curves.is_empty() {
        return;
    }
    let ymax = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.1))
        .fold(0.0, f64::max);
    let (top, step) = nice_axis(ymax);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / X_MAX_SLOT * pw;
    let sy = |y: f64| TOP + ph - y / top * ph;
    let _ = writeln!(
        out,
        "<h3>{} — latency by percentile (ms)</h3>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{} percentiles\">",
        esc(prefix),
        esc(prefix)
    );
    // Grid and y labels.
    let mut y = 0.0;
    while y <= top + step / 2.0 {
        let py = sy(y);
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e5e5e5\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - RIGHT,
            LEFT - 6.0,
            py + 4.0,
            fmt_tick(y)
        );
        y += step;
    }
    // x labels: the nines, then max.
    for (x, label) in [
        (0.301, "50%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
        (5.0, "99.999%"),
        (X_MAX_SLOT, "max"),
    ] {
        let px = sx(x);
        let _ = writeln!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#f0f0f0\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{label}</text>",
            TOP + ph,
            TOP + ph + 16.0
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{pw}\" height=\"{ph}\" fill=\"none\" stroke=\"#999\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>",
        LEFT + pw / 2.0,
        H - 6.0
    );
    for (i, c) in &curves {
        let points: Vec<String> = c
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
            colour(*i),
            points.join(" ")
        );
        for &(x, y) in c.iter().filter(|p| p.0 >= X_MAX_SLOT) {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>",
                sx(x),
                sy(y),
                colour(*i)
            );
        }
    }
    out.push_str("</svg>\n");
}

fn bars(out: &mut String, key: &str, runs: &Runs) {
    let vals: Vec<(usize, &String, f64)> = runs
        .iter()
        .filter_map(|(i, n, r)| Some((*i, *n, r.number(key)?)))
        .collect();
    if vals.is_empty() {
        return;
    }
    let max = vals.iter().map(|v| v.2).fold(0.0, f64::max);
    let (top, _) = nice_axis(max);
    let row = 22.0;
    let label_w = 220.0;
    let bar_w = W - label_w - 90.0;
    let h = row * vals.len() as f64 + 8.0;
    let _ = writeln!(
        out,
        "<h3>{}</h3>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" viewBox=\"0 0 {W} {h}\" role=\"img\" aria-label=\"{}\">",
        esc(key),
        esc(key)
    );
    for (row_i, (i, name, v)) in vals.iter().enumerate() {
        let y = 4.0 + row * row_i as f64;
        let w = if top > 0.0 { v / top * bar_w } else { 0.0 };
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><rect x=\"{label_w}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            label_w - 6.0,
            y + 14.0,
            esc(name),
            row - 6.0,
            colour(*i),
            label_w + w + 4.0,
            y + 14.0,
            esc(&fmt_number(*v))
        );
    }
    out.push_str("</svg>\n");
}

fn figures_table(out: &mut String, runs: &Runs) {
    let mut keys: Vec<&String> = Vec::new();
    for (_, _, r) in runs {
        for k in r.results.keys() {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    let ratio = runs.len() == 2;
    out.push_str("<h3>Figures</h3>\n<table>\n<tr><th class=\"k\">figure</th>");
    for (_, name, _) in runs {
        let _ = write!(out, "<th>{}</th>", esc(name));
    }
    if ratio {
        out.push_str("<th>b/a</th>");
    }
    out.push_str("</tr>\n");
    for k in keys {
        let _ = write!(out, "<tr><td class=\"k\">{}</td>", esc(k));
        for (_, _, r) in runs {
            let v = r.results.get(k).map(fmt_value).unwrap_or_default();
            let _ = write!(out, "<td>{}</td>", esc(&v));
        }
        if ratio {
            let (a, b) = (runs[0].2.number(k), runs[1].2.number(k));
            let cell = match (a, b) {
                (Some(a), Some(b)) if a != 0.0 => format!("{:.3}", b / a),
                _ => String::new(),
            };
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
}

fn steps(out: &mut String, runs: &Runs) {
    for (_, name, r) in runs.iter().filter(|(_, _, r)| !r.steps.is_empty()) {
        let _ = writeln!(out, "<h3>{} — search steps</h3>\n<table>", esc(name));
        let keys: Vec<&String> = r.steps[0].keys().collect();
        out.push_str("<tr>");
        for k in &keys {
            let _ = write!(out, "<th>{}</th>", esc(k));
        }
        out.push_str("</tr>\n");
        for step in &r.steps {
            out.push_str("<tr>");
            for k in &keys {
                let v = step.get(*k).map(fmt_value).unwrap_or_default();
                let _ = write!(out, "<td>{}</td>", esc(&v));
            }
            out.push_str("</tr>\n");
        }
        out.push_str("</table>\n");
    }
}

fn notes(out: &mut String, runs: &Runs) {
    for (_, name, r) in runs.iter().filter(|(_, _, r)| !r.notes.is_empty()) {
        let _ = writeln!(out, "<h3>{} — notes</h3>\n<ul class=\"notes\">", esc(name));
        for n in &r.notes {
            let _ = writeln!(out, "<li>{}</li>", esc(n));
        }
        out.push_str("</ul>\n");
    }
}

fn fmt_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else {
        format!("{x:.3}")
    }
}

fn fmt_value(v: &Value) -> String {
    match v {
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        Value::Number(n) => fmt_number(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Environment;

    fn report(scenario: &str, p99: f64, with_histogram: bool) -> Report {
        let mut r = Report::new(scenario, Environment::read(1024));
        let mut h = Latency::default();
        for i in 1..=1000u64 {
            h.record_ns(i * 1_000_000);
        }
        r.set("target", "wse");
        r.set("deliveries_per_s", 1234.5);
        r.latency("latency", &h.summary());
        r.set("latency_p99_ms", p99);
        if with_histogram {
            r.histogram("latency", &h);
        }
        r.note("a <note> & more");
        r
    }

    #[test]
    fn page_is_self_contained_and_escaped() {
        let runs = vec![
            ("a".to_owned(), report("fanout", 990.0, true)),
            ("b<x>".to_owned(), report("fanout", 500.0, false)),
            ("c".to_owned(), report("hold", 1.0, false)),
        ];
        let page = render(&runs);
        assert!(page.starts_with("<!DOCTYPE html>"));
        assert!(page.trim_end().ends_with("</html>"));
        // No external assets: nothing is fetched.
        for needle in ["src=", "href=", "<script", "@import", "url("] {
            assert!(!page.contains(needle), "{needle}");
        }
        // Two scenario sections, a percentile plot each, bars and tables.
        assert_eq!(page.matches("<section>").count(), 2);
        assert_eq!(page.matches("latency by percentile").count(), 2);
        assert!(page.contains("<h3>deliveries_per_s</h3>"));
        assert!(page.contains("b&lt;x&gt;") && !page.contains("b<x>"));
        assert!(page.contains("a &lt;note&gt; &amp; more"));
        // Two results of one scenario get a ratio column: 500 / 990.
        assert!(page.contains("<td>0.505</td>"), "ratio");
        // The histogram gives a whole curve (many points), the summary five.
        let polylines: Vec<&str> = page
            .split("<polyline")
            .skip(1)
            .map(|s| &s[..s.find("/>").unwrap()])
            .collect();
        assert_eq!(polylines.len(), 3);
        assert!(polylines[0].matches(',').count() > 40);
        assert_eq!(polylines[1].matches(',').count(), 5);
    }

    #[test]
    fn axes_are_round() {
        assert_eq!(nice_axis(9.3), (10.0, 2.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(nice_axis(123.0), (125.0, 25.0));
        assert_eq!(nice_axis(0.042), (0.05, 0.01));
    }
}
