//! What an operator loads into their monitoring: `deploy/prometheus/wse-alerts.yml` passes
//! `promtool check rules` and is docs/OPERATIONS.md's alert table word for word, and every
//! metric the rules, `deploy/grafana/wse-server.json` and OPERATIONS.md name is in the real
//! binary's `/metrics`, with the label values they select.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::Wse;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const RULES: &str = "deploy/prometheus/wse-alerts.yml";
const DASHBOARD: &str = "deploy/grafana/wse-server.json";
const OPERATIONS: &str = "docs/OPERATIONS.md";
/// How `.ci/run` installs promtool on a fresh Debian or Ubuntu machine.
const PROMTOOL_INSTALL: &str = "apt-get install -y --no-install-recommends prometheus";

/// Identifiers shaped like metric names that are not metrics: Prometheus's own `up`, log
/// targets (`wse_shards::alarms`), a token claim and crate names.
const NOT_METRICS: [&str; 5] = [
    "up",
    "wse_shards",
    "wse_server",
    "wse_queue_groups",
    "wse_client",
];
/// Labels Prometheus attaches at scrape time, absent from the exposition.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

fn read(relative: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(relative))
        .unwrap_or_else(|e| panic!("{relative}: {e}"))
}

#[test]
fn alert_rules_pass_promtool() {
    let out = Command::new("promtool")
        .args(["check", "rules", RULES])
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is needed to check {RULES} ({e}); install it: `{PROMTOOL_INSTALL}` \
                 (Debian/Ubuntu; .ci/run does this), or put Prometheus's promtool on PATH"
            )
        });
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promtool check rules:\n{text}");
    assert!(text.contains("SUCCESS: 18 rules found"), "{text}");
}

/// `(alert, expr)` in file order; each `expr` is on one line (the file's header says so).
fn rules() -> Vec<(String, String)> {
    let text = read(RULES);
    let mut out = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if let Some(name) = line.strip_prefix("- alert: ") {
            let expr = lines
                .next()
                .and_then(|l| l.strip_prefix("expr: "))
                .unwrap_or_else(|| panic!("{name}: expr must follow alert, on one line"));
            out.push((name.to_owned(), expr.to_owned()));
        }
    }
    out
}

/// `(alert, expr)` from OPERATIONS.md's "Metrics to alert on" table, in order.
fn documented_alerts() -> Vec<(String, String)> {
    let text = read(OPERATIONS);
    let section = text
        .split("## Metrics to alert on")
        .nth(1)
        .and_then(|s| s.split("\n#").next())
        .expect("OPERATIONS.md has a 'Metrics to alert on' section");
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .map(|row| {
            let (name, rest) = row.split_once("` | `").expect("| `Name` | `expr` | … |");
            let expr = rest.split("` |").next().unwrap().replace("\\|", "|");
            (name.to_owned(), expr)
        })
        .collect()
}

#[test]
fn alert_rules_are_the_documented_table() {
    let rules = rules();
    assert_eq!(rules.len(), 18, "{rules:?}");
    assert_eq!(rules, documented_alerts());
}

/// The PromQL expressions of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let dash: serde_json::Value = serde_json::from_str(&read(DASHBOARD)).expect("valid JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            out.push(target["expr"].as_str().expect("expr").to_owned());
        }
    }
    assert!(out.len() > 20, "{out:?}");
    out
}

/// A metric a query names, and the `label="value"` matchers it puts on it.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Selector {
    name: String,
    equals: Vec<(String, String)>,
}

/// Every `wse_*` / `process_*` identifier in `text`, with its exact-match label matchers.
fn selectors(text: &str) -> BTreeSet<Selector> {
    let bytes = text.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = BTreeSet::new();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (i == 0 || !ident(bytes[i - 1]))
            && (bytes[i..].starts_with(b"wse_") || bytes[i..].starts_with(b"process_"));
        if !starts {
            i += 1;
            continue;
        }
        let end = i + text[i..].bytes().take_while(|&b| ident(b)).count();
        let name = &text[i..end];
        let mut equals = Vec::new();
        if text[end..].starts_with('{') {
            let close = end + text[end..].find('}').expect("matchers close");
            for m in text[end + 1..close].split(',') {
                if let Some((k, v)) = m.split_once("=\"")
                    && !k.ends_with(['!', '=', '~'])
                {
                    equals.push((k.trim().to_owned(), v.trim_end_matches('"').to_owned()));
                }
            }
        }
        // `wse_x::y` is a Rust path and `wse_x.py` a file name, not metrics.
        let file_name = text[end..].starts_with('.')
            && text[end + 1..]
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic());
        if !NOT_METRICS.contains(&name) && !text[end..].starts_with("::") && !file_name {
            out.insert(Selector {
                name: name.to_owned(),
                equals,
            });
        }
        i = end;
    }
    out
}

/// Bound on the wait for two nodes to link and measure the link's RTT (it takes well under a
/// second; this only stops a broken build from hanging).
const LINK_WAIT: Duration = Duration::from_secs(20);

/// Two cluster nodes on loopback (security none), the second seeded with the first.
fn linked_pair() -> (Wse, Wse) {
    let port = |ip: &str| {
        let l = std::net::TcpListener::bind((ip, 0)).expect("bind a loopback address");
        l.local_addr().unwrap().to_string()
    };
    let (a1, a2) = (port("127.0.0.1"), port("127.0.0.2"));
    let cluster = ["--cluster-enabled", "true", "--cluster-security", "none"];
    let m1 = Wse::start(
        &[
            &cluster[..],
            &["--cluster-node-name", "m1", "--cluster-listen", &a1],
        ]
        .concat(),
    );
    let m2 = Wse::start(
        &[
            &cluster[..],
            &["--cluster-node-name", "m2", "--cluster-listen", &a2],
            &["--cluster-seeds", &a1],
        ]
        .concat(),
    );
    (m1, m2)
}

#[tokio::test]
async fn every_metric_rules_dashboard_and_docs_name_is_exported() {
    let mut wanted = BTreeSet::new();
    for (_, expr) in rules() {
        wanted.extend(selectors(&expr));
    }
    for expr in dashboard_exprs() {
        wanted.extend(selectors(&expr));
    }
    wanted.extend(selectors(&read(OPERATIONS)));
    wanted.extend(selectors(&read("docs/API.md")));
    wanted.extend(selectors(&read("README.md")));
    // The ones the issue names, so that emptying the files cannot pass this test.
    for name in [
        "wse_max_connections",
        "wse_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
    ] {
        assert!(
            wanted.iter().any(|s| s.name == name),
            "{name} is used nowhere"
        );
    }

    // A node linked to a peer, so that the cluster's per-peer series exist too.
    let (wse, _peer) = linked_pair();
    let deadline = Instant::now() + LINK_WAIT;
    let scrape = loop {
        let (status, scrape) = wse.http("GET", "/metrics", &[], "").await;
        assert_eq!(status, 200);
        if scrape.contains("wse_cluster_peer_rtt_seconds{peer=\"m2\"}") {
            break scrape;
        }
        assert!(
            Instant::now() < deadline,
            "no link to m2 with its RTT in {LINK_WAIT:?}:\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let samples: Vec<(&str, &str)> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let key = l.rsplit_once(' ').map_or(l, |(k, _)| k);
            key.split_once('{').unwrap_or((key, ""))
        })
        .collect();
    let mut missing = Vec::new();
    for s in &wanted {
        let found = samples.iter().any(|(name, labels)| {
            *name == s.name
                && s.equals
                    .iter()
                    .filter(|(k, _)| !TARGET_LABELS.contains(&k.as_str()))
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
        });
        if !found {
            missing.push(s);
        }
    }
    assert!(
        missing.is_empty(),
        "named in the rules, the dashboard or the docs but not in /metrics: {missing:#?}\n\
         /metrics:\n{scrape}"
    );
}
