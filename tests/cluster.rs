//! The cluster core with real binaries (docs/CLUSTER.md): nodes on 127.0.0.1/.2/.3/.4 with a
//! PSK form a full mesh from one seed, see a `kill -9`ed node die and a stopped one leave, and
//! refuse a node with another key (with `tls`: another CA's certificate, or one not for the
//! node's name); publications (client and HTTP, on any node) reach every
//! subscriber on every node exactly once, in per-publisher order, and a subscription is
//! acknowledged only once the other nodes will send it what they publish.

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{API_KEY, Wse, publisher_token, token};
use wse_client::{Client, Connector};

/// The PSK the nodes share (at least 32 bytes).
const PSK: &str = "cluster-test-psk-0123456789abcdef0123";
/// Bound on each wait for the mesh to converge or a death to spread. The protocol's own
/// figures are ~1 s for a death with confirmations (docs/CLUSTER.md); this only stops a broken
/// build from hanging CI.
const CONVERGE: Duration = Duration::from_secs(20);
/// Pause between two polls of `/api/v1/cluster`.
const POLL: Duration = Duration::from_millis(50);

/// A free port on `ip` (bound, read, released: the node binds it again at once).
fn free_port(ip: &str) -> String {
    let l = std::net::TcpListener::bind((ip, 0)).expect("bind a loopback address");
    l.local_addr().unwrap().to_string()
}

fn node(name: &str, listen: &str, seeds: &[&str], psk: &str) -> Wse {
    node_with(
        name,
        listen,
        seeds,
        &["--cluster-security", "psk", "--cluster-psk", psk],
    )
}

fn node_with(name: &str, listen: &str, seeds: &[&str], security: &[&str]) -> Wse {
    let seeds = seeds.join(",");
    let mut args = vec!["--cores", "1", "--cluster-enabled", "true"];
    args.extend_from_slice(security);
    args.extend(["--cluster-node-name", name, "--cluster-listen", listen]);
    if !seeds.is_empty() {
        args.extend(["--cluster-seeds", seeds.as_str()]);
    }
    Wse::start(&args)
}

/// `GET /api/v1/cluster` on `w`.
async fn view(w: &Wse) -> Value {
    let auth = format!("Bearer {API_KEY}");
    let (status, body) = w
        .http("GET", "/api/v1/cluster", &[("Authorization", &auth)], "")
        .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `GET /api/v1/cluster/dlq` on `w`.
async fn dlq(w: &Wse) -> Value {
    let auth = format!("Bearer {API_KEY}");
    let (status, body) = w
        .http(
            "GET",
            "/api/v1/cluster/dlq",
            &[("Authorization", &auth)],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Member name → (state, link up, RTT measured) as `w` sees them.
async fn members(w: &Wse) -> BTreeMap<String, (String, bool, bool)> {
    let v = view(w).await;
    v["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    (
                        m["name"].as_str().unwrap().to_owned(),
                        (
                            m["state"].as_str().unwrap().to_owned(),
                            m["link"].as_bool().unwrap(),
                            m["rtt_us"].is_u64(),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Polls until `done` holds for every node's member table, or panics at the deadline with
/// what each node saw last.
async fn await_tables(
    nodes: &[(&str, &Wse)],
    what: &str,
    done: impl Fn(&str, &BTreeMap<String, (String, bool, bool)>) -> bool,
) {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let mut seen = Vec::new();
        let mut all = true;
        for (name, w) in nodes {
            let t = members(w).await;
            all &= done(name, &t);
            seen.push((name.to_string(), t));
        }
        if all {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {CONVERGE:?}; tables: {seen:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_fourth_node_joins_by_one_seed_and_a_killed_node_is_declared_dead() {
    let a1 = free_port("127.0.0.1");
    let a2 = free_port("127.0.0.2");
    let a3 = free_port("127.0.0.3");
    let a4 = free_port("127.0.0.4");
    let started = Instant::now();
    let n1 = node("n1", &a1, &[], PSK);
    let n2 = node("n2", &a2, &[&a1], PSK);
    let n3 = node("n3", &a3, &[&a1, &a2], PSK);
    // The fourth knows only node 1; it must learn of the others and link to each.
    let n4 = node("n4", &a4, &[&a1], PSK);
    let names = ["n1", "n2", "n3", "n4"];
    await_tables(
        &[("n1", &n1), ("n2", &n2), ("n3", &n3), ("n4", &n4)],
        "full mesh of 4, every link up with its RTT measured",
        |me, t| {
            names.iter().filter(|n| **n != me).all(|n| {
                t.get(*n)
                    .is_some_and(|(s, link, rtt)| s == "alive" && *link && *rtt)
            }) && t.len() == 3
        },
    )
    .await;
    // Reported, not asserted (figures belong to bench/): start of node 1 to the full mesh.
    eprintln!("full mesh of 4 with RTTs after {:?}", started.elapsed());
    // A node never lists itself; it names itself in "node".
    let v = view(&n4).await;
    assert_eq!(v["node"]["name"], "n4");
    assert_eq!(v["enabled"], true);
    assert_eq!(v["routing"], true);
    // Every membership change is logged: each node logged the newcomer's arrival.
    for w in [&n1, &n2, &n3] {
        assert!(
            w.wait_log("cluster member n4 is alive", 1, CONVERGE),
            "{}",
            w.log()
        );
    }

    // kill -9 (dropping a Wse kills it with SIGKILL): the others see the link reset, probe, and
    // declare it dead, each with a log line.
    let killed = Instant::now();
    drop(n3);
    for w in [&n1, &n2, &n4] {
        assert!(
            w.wait_log("cluster member n3 is dead", 1, CONVERGE),
            "n3 not declared dead; log:\n{}",
            w.log()
        );
    }
    eprintln!(
        "n3 dead on the other three {:?} after kill -9",
        killed.elapsed()
    );
    await_tables(
        &[("n1", &n1), ("n2", &n2), ("n4", &n4)],
        "n3 dead everywhere, the rest still linked",
        |me, t| {
            t.get("n3").is_some_and(|(s, link, _)| s == "dead" && !link)
                && ["n1", "n2", "n4"]
                    .iter()
                    .filter(|n| **n != me)
                    .all(|n| t.get(*n).is_some_and(|(s, link, _)| s == "alive" && *link))
        },
    )
    .await;

    // SIGTERM: after its own drain the node leaves; the others mark it Left (not dead, no
    // suspicion) and the process exits cleanly.
    let mut n4 = n4;
    n4.sigterm();
    for w in [&n1, &n2] {
        assert!(
            w.wait_log("cluster member n4 is left", 1, CONVERGE),
            "n4 not marked left; log:\n{}",
            w.log()
        );
    }
    assert!(n4.wait_exit(CONVERGE).is_some_and(|s| s.success()));
}

#[tokio::test(flavor = "current_thread")]
async fn a_node_with_another_psk_is_refused() {
    let a1 = free_port("127.0.0.1");
    let a2 = free_port("127.0.0.2");
    let n1 = node("n1", &a1, &[], PSK);
    let intruder = node("x9", &a2, &[&a1], "another-psk-entirely-0123456789abcdef");
    // Two failed handshakes on each side (the intruder redials its seed after the first), so
    // the refusal is not a race with a first attempt still under way.
    for w in [&n1, &intruder] {
        assert!(
            w.wait_log("cluster handshake with", 2, CONVERGE),
            "no failed handshake; log:\n{}",
            w.log()
        );
    }
    assert!(members(&n1).await.is_empty(), "{:?}", view(&n1).await);
    assert!(
        members(&intruder).await.is_empty(),
        "{:?}",
        view(&intruder).await
    );
    assert!(!n1.log().contains("cluster member x9"));
}

#[tokio::test(flavor = "current_thread")]
async fn security_none_links_nodes_on_loopback() {
    let a1 = free_port("127.0.0.1");
    let a2 = free_port("127.0.0.2");
    let none = ["--cluster-security", "none"];
    let n1 = node_with("n1", &a1, &[], &none);
    let n2 = node_with("n2", &a2, &[&a1], &none);
    await_tables(&[("n1", &n1), ("n2", &n2)], "two nodes linked", |me, t| {
        let other = if me == "n1" { "n2" } else { "n1" };
        t.len() == 1
            && t.get(other)
                .is_some_and(|(s, link, _)| s == "alive" && *link)
    })
    .await;
}

/// A private CA and node certificates made with the `openssl` command, as docs/CLUSTER.md
/// shows, in a directory of its own (removed at drop).
struct Pki {
    dir: std::path::PathBuf,
}

impl Pki {
    /// A new CA named `ca` in a fresh directory.
    fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("wse-cluster-pki-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Self { dir };
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "30",
            "-subj",
            &format!("/CN=wse test CA {tag}"),
        ]);
        pki
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(&self.dir)
            .output()
            .expect("the openssl command (installed by .ci/run)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `file.pem` / `file.key`: a certificate signed by this CA whose SAN is `DNS:san`.
    fn issue(&self, file: &str, san: &str) {
        std::fs::write(
            self.dir.join(format!("{file}.ext")),
            format!(
                "subjectAltName=DNS:{san}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
            ),
        )
        .unwrap();
        let (key, csr, pem, ext) = (
            format!("{file}.key"),
            format!("{file}.csr"),
            format!("{file}.pem"),
            format!("{file}.ext"),
        );
        let subj = format!("/CN={san}");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_string_lossy().into_owned()
    }

    /// The `--cluster-*` flags of a node using `file`'s certificate and `ca` (this CA's file
    /// or another's).
    fn flags(&self, ca: &Pki, file: &str) -> Vec<String> {
        [
            "--cluster-security".to_owned(),
            "tls".to_owned(),
            "--cluster-tls-ca".to_owned(),
            ca.path("ca.pem"),
            "--cluster-tls-cert".to_owned(),
            self.path(&format!("{file}.pem")),
            "--cluster-tls-key".to_owned(),
            self.path(&format!("{file}.key")),
        ]
        .to_vec()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_node(name: &str, listen: &str, seeds: &[&str], flags: &[String]) -> Wse {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    node_with(name, listen, seeds, &flags)
}

#[tokio::test(flavor = "current_thread")]
async fn tls_nodes_form_the_mesh_and_a_publication_crosses() {
    let pki = Pki::new("mesh");
    for n in ["n1", "n2", "n3"] {
        pki.issue(n, n);
    }
    let addrs: Vec<String> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|ip| free_port(ip))
        .collect();
    let mut nodes = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let seeds: Vec<&str> = if i == 0 { vec![] } else { vec![&addrs[0]] };
        nodes.push((
            name.clone(),
            tls_node(&name, a, &seeds, &pki.flags(&pki, &name)),
        ));
    }
    let refs: Vec<(&str, &Wse)> = nodes.iter().map(|(n, w)| (n.as_str(), w)).collect();
    await_tables(&refs, "full mesh over TLS", |me, t| {
        t.len() == 2
            && ["n1", "n2", "n3"]
                .iter()
                .filter(|n| **n != me)
                .all(|n| t.get(*n).is_some_and(|(s, link, _)| s == "alive" && *link))
    })
    .await;
    let mut sub = client(&nodes[2].1, "sub-n3", false).await;
    subscribed(&mut sub, "tls-room").await;
    let (status, text) = nodes[0].1.api_publish("tls-room", "hello", json!(1)).await;
    assert_eq!(status, 200, "{text}");
    let (event, p) = next_publication(&mut sub, "published on n1 over TLS").await;
    assert_eq!((event.as_str(), p), ("hello", json!(1)));
}

/// `intruder` (started with `flags`, seeded with a node of the real CA) is refused by that
/// node, twice (it redials), and never becomes a member there; returns the intruder. Only the
/// node that verifies the bad certificate fails its handshake: in TLS 1.3 the client's
/// handshake is done before the server has checked its certificate, and a dialler that gets
/// the acceptor's HELLO finds it good (docs/CLUSTER.md, "TLS").
async fn assert_refused(
    tag: &str,
    intruder_name: &str,
    flags: impl Fn(&Pki) -> Vec<String>,
) -> Wse {
    let pki = Pki::new(tag);
    pki.issue("n1", "n1");
    let a1 = free_port("127.0.0.1");
    let a2 = free_port("127.0.0.2");
    let n1 = tls_node("n1", &a1, &[], &pki.flags(&pki, "n1"));
    let intruder = tls_node(intruder_name, &a2, &[&a1], &flags(&pki));
    assert!(
        n1.wait_log("cluster handshake with", 2, CONVERGE),
        "no failed handshake; log:\n{}",
        n1.log()
    );
    assert!(members(&n1).await.is_empty(), "{:?}", view(&n1).await);
    let member_line = format!("cluster member {intruder_name}");
    assert!(!n1.log().contains(&member_line), "{}", n1.log());
    intruder
}

#[tokio::test(flavor = "current_thread")]
async fn tls_refuses_a_certificate_of_another_ca() {
    let other = Pki::new("other-ca");
    other.issue("x9", "x9");
    // The intruder trusts the real CA, but its own certificate is the other CA's.
    let intruder = assert_refused("another-ca", "x9", |real| other.flags(real, "x9")).await;
    // n1 ended the TLS session before any HELLO: the intruder learnt nothing of it.
    assert!(
        members(&intruder).await.is_empty(),
        "{:?}",
        view(&intruder).await
    );
}

#[tokio::test(flavor = "current_thread")]
async fn tls_refuses_a_hello_name_the_certificate_does_not_hold() {
    // A certificate of the right CA, for "n7", used by a node that calls itself "n9".
    let intruder = assert_refused("wrong-san", "n9", |real| {
        real.issue("n7", "n7");
        real.flags(real, "n7")
    })
    .await;
    // n1 refuses it with AUTH_FAILED right after its HELLO: each link the intruder sees come up
    // goes down at once.
    assert!(
        intruder.wait_log("cluster link to n1 down", 2, CONVERGE),
        "{}",
        intruder.log()
    );
}

#[tokio::test(flavor = "current_thread")]
async fn sighup_reloads_the_cluster_certificates_for_new_links() {
    // n1 starts with CA A's files; a node of CA B is refused until n1's files are replaced with
    // CA B's and n1 gets a SIGHUP.
    let (a, b) = (Pki::new("reload-a"), Pki::new("reload-b"));
    a.issue("n1", "n1");
    b.issue("n1", "n1");
    b.issue("n2", "n2");
    let a1 = free_port("127.0.0.1");
    let a2 = free_port("127.0.0.2");
    let n1 = tls_node("n1", &a1, &[], &a.flags(&a, "n1"));
    let n2 = tls_node("n2", &a2, &[&a1], &b.flags(&b, "n2"));
    assert!(
        n1.wait_log("cluster handshake with", 1, CONVERGE),
        "{}",
        n1.log()
    );
    assert!(members(&n1).await.is_empty());
    for f in ["ca.pem", "n1.pem", "n1.key"] {
        std::fs::copy(b.dir.join(f), a.dir.join(f)).unwrap();
    }
    n1.sighup();
    assert!(
        n1.wait_log("cluster certificates reloaded for new links", 1, CONVERGE),
        "{}",
        n1.log()
    );
    // n2 redials (its breaker backs off, within CONVERGE) and is now let in.
    await_tables(
        &[("n1", &n1), ("n2", &n2)],
        "linked after the reload",
        |me, t| {
            let other = if me == "n1" { "n2" } else { "n1" };
            t.get(other)
                .is_some_and(|(s, link, _)| s == "alive" && *link)
        },
    )
    .await;
}

#[test]
fn tls_with_a_bad_key_or_missing_file_is_refused_at_start() {
    let pki = Pki::new("bad-files");
    pki.issue("n1", "n1");
    pki.issue("n2", "n2");
    let listen = free_port("127.0.0.1");
    let run = |ca: &str, cert: &str, key: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_wse-server"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--control-enabled",
                "false",
                "--cluster-enabled",
                "true",
                "--cluster-listen",
                &listen,
                "--cluster-security",
                "tls",
                "--cluster-tls-ca",
                ca,
                "--cluster-tls-cert",
                cert,
                "--cluster-tls-key",
                key,
            ])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ca, cert) = (pki.path("ca.pem"), pki.path("n1.pem"));
    // A missing file: refused by validation, exit 2, naming the key.
    let (code, stderr) = run(&ca, &cert, &pki.path("none.key"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("cluster.tls_key") && stderr.contains("no such file"),
        "{stderr}"
    );
    // Another node's key: refused when loaded, exit 1, one line naming the key.
    let (code, stderr) = run(&ca, &cert, &pki.path("n2.key"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("cluster.tls_key") && stderr.contains("does not go with"),
        "{stderr}"
    );
    // Not PEM at all.
    let (code, stderr) = run(&pki.path("n1.ext"), &cert, &pki.path("n1.key"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cluster.tls_ca"), "{stderr}");
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_on_the_cluster_port_is_refused_and_its_log_lines_are_rate_limited() {
    /// Connections that send garbage: well past the 10 lines a second the core logs.
    const BURST: usize = 60;
    let a1 = free_port("127.0.0.1");
    let n1 = node("n1", &a1, &[], PSK);
    for _ in 0..BURST {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&a1).unwrap();
        // Not a PREFACE: the handshake fails at once.
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
    }
    assert!(
        n1.wait_log("cluster handshake with", 1, CONVERGE),
        "{}",
        n1.log()
    );
    // Failures keep coming, one per poll: the first line logged in a later window carries the
    // count of those left out.
    let deadline = Instant::now() + CONVERGE;
    while !has_nonzero_left_out(&n1.log()) {
        assert!(Instant::now() < deadline, "{}", n1.log());
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(&a1).unwrap();
        let _ = s.write_all(b"garbage!");
        tokio::time::sleep(POLL).await;
    }
    let lines = n1.log().matches("cluster handshake with").count();
    eprintln!("{lines} failed-handshake lines logged");
    assert!(lines < BURST, "{lines} lines for {BURST}+ failures");
    assert!(members(&n1).await.is_empty());
}

/// Whether a failed-handshake line reports some left out.
fn has_nonzero_left_out(log: &str) -> bool {
    log.split("left_out=")
        .skip(1)
        .any(|rest| rest.split_whitespace().next().is_some_and(|n| n != "0"))
}

/// Publications per publisher in the crossing test.
const PER_PUBLISHER: u64 = 25;
/// Bound on one awaited message (a broken build must not hang CI).
const MESSAGE_WAIT: Duration = Duration::from_secs(10);
/// How long a subscriber listens for a duplicate after it has everything: a negative check
/// cannot await an event, so it is a bounded quiet period.
const QUIET: Duration = Duration::from_millis(500);

/// Three meshed nodes on 127.0.0.1/.2/.3, two shards each (so owner and subscriber shards
/// differ), with a PSK.
async fn three_nodes() -> Vec<(String, Wse)> {
    meshed(3).await
}

/// `count` (≤ 3) meshed nodes, as [`three_nodes`].
async fn meshed(count: usize) -> Vec<(String, Wse)> {
    let addrs: Vec<String> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"][..count]
        .iter()
        .map(|ip| free_port(ip))
        .collect();
    let mut nodes = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let name = format!("n{}", i + 1);
        let seeds = if i == 0 {
            String::new()
        } else {
            addrs[0].clone()
        };
        let mut args = vec![
            "--cores",
            "2",
            "--cluster-enabled",
            "true",
            "--cluster-security",
            "psk",
            "--cluster-psk",
            PSK,
            "--cluster-node-name",
            &name,
            "--cluster-listen",
            a,
        ];
        if !seeds.is_empty() {
            args.extend(["--cluster-seeds", &seeds]);
        }
        let w = Wse::start(&args);
        nodes.push((name, w));
    }
    let refs: Vec<(&str, &Wse)> = nodes.iter().map(|(n, w)| (n.as_str(), w)).collect();
    let names: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
    await_tables(&refs, "full mesh", |me, t| {
        t.len() == count - 1
            && names
                .iter()
                .filter(|n| *n != me)
                .all(|n| t.get(n).is_some_and(|(s, link, _)| s == "alive" && *link))
    })
    .await;
    nodes
}

async fn client(w: &Wse, user: &str, publish: bool) -> Client {
    let t = if publish {
        publisher_token(user)
    } else {
        token(user, json!({}))
    };
    let mut c = Connector::new(w.url())
        .token(t)
        .request_timeout(MESSAGE_WAIT)
        .connect()
        .await
        .unwrap();
    c.set_auto_pong(true);
    c
}

async fn subscribed(c: &mut Client, topic: &str) {
    let ack = c.subscribe(&[topic]).await.unwrap();
    assert_eq!(
        ack.p["success_topics"],
        json!([topic]),
        "{}",
        ack.describe()
    );
}

/// The next publication (events other than publications, such as pings, are skipped).
async fn next_publication(c: &mut Client, what: &str) -> (String, Value) {
    loop {
        match c.recv().await {
            Ok(ev) if ev.c.as_deref() == Some("U") => return (ev.t, ev.p),
            Ok(_) => {}
            Err(e) => panic!("{what}: no publication within {MESSAGE_WAIT:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn publications_cross_nodes_exactly_once_in_per_publisher_order() {
    const TOPIC: &str = "room";
    let nodes = three_nodes().await;
    let mut subs = Vec::new();
    let mut pubs = Vec::new();
    for (name, w) in &nodes {
        let mut s = client(w, &format!("sub-{name}"), false).await;
        let hello = s.server_hello().expect("server_hello");
        assert_eq!(hello.p["features"]["cluster"], true, "{}", hello.describe());
        subscribed(&mut s, TOPIC).await;
        subs.push(s);
        pubs.push(client(w, &format!("pub-{name}"), true).await);
        assert_eq!(view(w).await["routing"], true);
    }
    // Every node publishes through a client and through the HTTP API, interleaved.
    for seq in 0..PER_PUBLISHER {
        for ((name, w), p) in nodes.iter().zip(pubs.iter_mut()) {
            let from = format!("{name}-ws");
            p.publish(TOPIC, "m", json!({"from": from, "seq": seq}))
                .await
                .unwrap();
            let from = format!("{name}-http");
            let (status, body) = w
                .api_publish(TOPIC, "m", json!({"from": from, "seq": seq}))
                .await;
            assert_eq!(status, 200, "{body}");
        }
    }
    let publishers = 2 * nodes.len() as u64;
    for ((name, _), s) in nodes.iter().zip(subs.iter_mut()) {
        let mut next: BTreeMap<String, u64> = BTreeMap::new();
        for n in 0..publishers * PER_PUBLISHER {
            let (event, p) = next_publication(s, &format!("subscriber on {name}, #{n}")).await;
            assert_eq!(event, "m");
            let from = p["from"].as_str().unwrap().to_owned();
            let seq = p["seq"].as_u64().unwrap();
            let want = next.entry(from.clone()).or_insert(0);
            assert_eq!(seq, *want, "subscriber on {name}: {from} out of order");
            *want += 1;
        }
        assert_eq!(next.len() as u64, publishers, "{next:?}");
        assert!(next.values().all(|n| *n == PER_PUBLISHER), "{next:?}");
        // Exactly once: nothing more comes.
        while let Some(ev) = s.recv_timeout(QUIET).await.unwrap() {
            assert_ne!(ev.c.as_deref(), Some("U"), "duplicate: {}", ev.describe());
        }
    }
    // broadcast_local stays on its node: node 1's next publication overtakes nothing elsewhere
    // (one node's publications reach a peer in the order they were made there).
    let (_, n1) = &nodes[0];
    let auth = format!("Bearer {API_KEY}");
    let body = json!({"topic": TOPIC, "event": "local", "data": 1}).to_string();
    let (status, text) = n1
        .http(
            "POST",
            "/api/v1/broadcast_local",
            &[("Authorization", &auth)],
            &body,
        )
        .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = n1.api_publish(TOPIC, "after", json!(2)).await;
    assert_eq!(status, 200, "{text}");
    let (event, _) = next_publication(&mut subs[0], "local broadcast on n1").await;
    assert_eq!(event, "local");
    for ((name, _), s) in nodes.iter().zip(subs.iter_mut()) {
        let (event, _) = next_publication(s, &format!("publication after on {name}")).await;
        assert_eq!(event, "after", "{name} got node 1's local broadcast");
    }
    // Node 1 handed its core what it made (client, HTTP, `after`), never what came from its
    // peers, and got each of the two peers' publications once.
    let v = view(n1).await;
    assert_eq!(v["publications"]["sent"], 2 * PER_PUBLISHER + 1, "{v}");
    assert_eq!(v["publications"]["received"], 2 * 2 * PER_PUBLISHER, "{v}");
    assert_eq!(v["publications"]["dropped"], 0, "{v}");
    assert_eq!(v["publications"]["dropped_peer_queue"], 0, "{v}");
}

#[tokio::test(flavor = "current_thread")]
async fn an_acknowledged_subscription_gets_what_another_node_publishes_right_after() {
    let nodes = three_nodes().await;
    let mut subs = Vec::new();
    for (name, w) in &nodes {
        subs.push(client(w, &format!("sub-{name}"), false).await);
    }
    // Each topic fresh (nobody anywhere subscribed before), subscribed on one node and
    // published on the next at once after the acknowledgement.
    for round in 0..9 {
        let at = round % nodes.len();
        let by = (round + 1) % nodes.len();
        let topic = format!("fresh-{round}");
        subscribed(&mut subs[at], &topic).await;
        let (status, text) = nodes[by].1.api_publish(&topic, "first", json!(round)).await;
        assert_eq!(status, 200, "{text}");
        let what = format!(
            "{topic} subscribed on {}, published on {}",
            nodes[at].0, nodes[by].0
        );
        let (event, p) = next_publication(&mut subs[at], &what).await;
        assert_eq!((event.as_str(), p), ("first", json!(round)), "{what}");
    }
}

/// Reads from `members` until `want` publications arrived between them (bounded), then checks
/// that no more come; returns each publication's `seq`, sorted.
async fn drain_group(members: &mut [Client], want: usize, what: &str) -> Vec<u64> {
    let deadline = Instant::now() + MESSAGE_WAIT;
    let mut seqs = Vec::new();
    while seqs.len() < want {
        assert!(
            Instant::now() < deadline,
            "{what}: {} of {want}",
            seqs.len()
        );
        for m in members.iter_mut() {
            if let Some(ev) = m.recv_timeout(POLL).await.unwrap()
                && ev.c.as_deref() == Some("U")
            {
                seqs.push(ev.p["seq"].as_u64().unwrap());
            }
        }
    }
    for m in members.iter_mut() {
        while let Some(ev) = m.recv_timeout(QUIET).await.unwrap() {
            assert_ne!(
                ev.c.as_deref(),
                Some("U"),
                "{what}: extra {}",
                ev.describe()
            );
        }
    }
    seqs.sort_unstable();
    seqs
}

#[tokio::test(flavor = "current_thread")]
async fn a_queue_group_across_nodes_gets_each_publication_once() {
    const TOPIC: &str = "jobs";
    const N: u64 = 30;
    let nodes = three_nodes().await;
    let group_token = |user: &str| token(user, json!({"wse_queue_groups": {"allow": ["workers"]}}));
    // Two members on node 2, one on node 3, none on node 1; a plain subscriber on node 2.
    let mut members = Vec::new();
    for (i, at) in [1usize, 1, 2].into_iter().enumerate() {
        let mut m = Connector::new(nodes[at].1.url())
            .token(group_token(&format!("worker{i}")))
            .request_timeout(MESSAGE_WAIT)
            .connect()
            .await
            .unwrap();
        let ack = m
            .subscribe_with(json!({"action":"subscribe","topics":[TOPIC],"queue_group":"workers"}))
            .await
            .unwrap();
        assert_eq!(ack.p["success"], true, "{}", ack.describe());
        members.push(m);
    }
    let mut plain = client(&nodes[1].1, "plain", false).await;
    subscribed(&mut plain, TOPIC).await;
    // Made on node 1, which has no member: one member somewhere else gets each.
    for seq in 0..N {
        let (status, text) = nodes[0]
            .1
            .api_publish(TOPIC, "job", json!({"seq": seq}))
            .await;
        assert_eq!(status, 200, "{text}");
    }
    let got = drain_group(&mut members, N as usize, "made on n1").await;
    assert_eq!(got, (0..N).collect::<Vec<_>>());
    for seq in 0..N {
        let (_, p) = next_publication(&mut plain, "plain subscriber on n2").await;
        assert_eq!(p["seq"], seq);
    }
    // Made on node 3, which has a member: the group gets each once there or elsewhere.
    for seq in N..2 * N {
        let (status, text) = nodes[2]
            .1
            .api_publish(TOPIC, "job", json!({"seq": seq}))
            .await;
        assert_eq!(status, 200, "{text}");
    }
    let got = drain_group(&mut members, N as usize, "made on n3").await;
    assert_eq!(got, (N..2 * N).collect::<Vec<_>>());
}

#[tokio::test(flavor = "current_thread")]
async fn a_burst_crosses_to_another_node_without_loss_in_order() {
    /// Publications sent back to back, without waiting for anything.
    const BURST: u64 = 5_000;
    let nodes = meshed(2).await;
    let mut sub = client(&nodes[1].1, "sub", false).await;
    subscribed(&mut sub, "burst").await;
    let mut publisher = client(&nodes[0].1, "pub", true).await;
    for seq in 0..BURST {
        publisher
            .publish("burst", "m", json!({"seq": seq}))
            .await
            .unwrap();
    }
    for seq in 0..BURST {
        let (_, p) = next_publication(&mut sub, &format!("#{seq} of the burst")).await;
        assert_eq!(p["seq"], seq);
    }
    let v = view(&nodes[1].1).await;
    assert_eq!(v["publications"]["received"], BURST, "{v}");
    assert_eq!(v["publications"]["dropped"], 0, "{v}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_publication_over_a_peers_queue_cap_is_dead_lettered_and_counted() {
    /// Over the 4 KiB queue cap node 1 runs with: every such publication for a peer is dropped.
    const BIG: usize = 8 * 1024;
    let a1 = free_port("127.0.0.1");
    let a2 = free_port("127.0.0.2");
    let mut args = vec![
        "--cluster-batch-max",
        "4096",
        "--cluster-peer-queue-bytes",
        "4096",
        "--cluster-dlq-entries",
        "8",
    ];
    args.extend(["--cluster-security", "psk", "--cluster-psk", PSK]);
    let n1 = node_with("n1", &a1, &[], &args);
    let n2 = node("n2", &a2, &[&a1], PSK);
    await_tables(&[("n1", &n1), ("n2", &n2)], "two nodes linked", |me, t| {
        let other = if me == "n1" { "n2" } else { "n1" };
        t.get(other)
            .is_some_and(|(s, link, _)| s == "alive" && *link)
    })
    .await;
    assert_eq!(dlq(&n1).await["entries"], json!([]));
    let mut sub = client(&n2, "sub", false).await;
    subscribed(&mut sub, "big").await;
    let (status, text) = n1.api_publish("big", "m", json!("x".repeat(BIG))).await;
    assert_eq!(status, 200, "{text}");
    // A small one after it still crosses: only the big one was dropped.
    let (status, text) = n1.api_publish("big", "small", json!(1)).await;
    assert_eq!(status, 200, "{text}");
    let (event, _) = next_publication(&mut sub, "the small publication").await;
    assert_eq!(event, "small");
    let v = dlq(&n1).await;
    assert_eq!(v["enabled"], true, "{v}");
    assert_eq!(v["capacity"], 8, "{v}");
    assert_eq!(v["total"], 1, "{v}");
    let entries = v["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{v}");
    let e = &entries[0];
    assert_eq!(
        (&e["peer"], &e["topic"]),
        (&json!("n2"), &json!("big")),
        "{v}"
    );
    assert_eq!(e["reason"], "peer_queue_full", "{v}");
    assert!(e["bytes"].as_u64().unwrap() > BIG as u64, "{v}");
    assert!(
        humantime::parse_rfc3339(e["time"].as_str().unwrap()).is_ok(),
        "{v}"
    );
    use base64::Engine as _;
    let prefix = base64::engine::general_purpose::STANDARD
        .decode(e["prefix"].as_str().unwrap())
        .unwrap();
    assert_eq!(prefix.len(), 64, "{v}");
    // The same drop in /metrics and the cluster view; node 2's DLQ is empty.
    let dropped = n1
        .metric(
            "wse_cluster_publications_dropped_total",
            "reason=\"peer_queue_full\"",
        )
        .await;
    assert_eq!(dropped, 1.0);
    assert_eq!(n1.metric("wse_cluster_dlq_entries", "").await, 1.0);
    assert_eq!(n1.metric("wse_cluster_links_up", "").await, 1.0);
    assert_eq!(
        n1.metric("wse_cluster_members", "state=\"alive\"").await,
        1.0
    );
    assert!(
        n1.metric("wse_cluster_sent_bytes_total", "peer=\"n2\"")
            .await
            > 0.0
    );
    let view1 = view(&n1).await;
    assert_eq!(view1["dlq_entries"], 1, "{view1}");
    assert!(
        view1["members"][0]["bytes_received"].as_u64().unwrap() > 0,
        "{view1}"
    );
    assert_eq!(dlq(&n2).await["entries"], json!([]));
}

/// How long the drained node's drain may last: a client of it that never reads holds the drain
/// open this long, which is the window in which the others must see it as a lame duck.
const DRAIN_SECS: u64 = 6;

#[tokio::test(flavor = "current_thread")]
async fn a_drained_node_is_a_lame_duck_then_leaves_while_the_others_keep_serving() {
    const TOPIC: &str = "room";
    let mut nodes = three_nodes().await;
    let mut subs = Vec::new();
    for (name, w) in &nodes {
        let mut s = client(w, &format!("sub-{name}"), false).await;
        subscribed(&mut s, TOPIC).await;
        subs.push(s);
    }
    // Never reads, so never answers its close: n3's drain lasts its whole timeout.
    let _mute = client(&nodes[2].1, "mute", false).await;
    let auth = format!("Bearer {API_KEY}");
    let body = json!({ "timeout": DRAIN_SECS }).to_string();
    let (status, text) = nodes[2]
        .1
        .http("POST", "/api/v1/drain", &[("Authorization", &auth)], &body)
        .await;
    assert_eq!(status, 200, "{text}");
    match subs[2].recv_until(|_| false, MESSAGE_WAIT).await {
        Err(wse_client::Error::Closed { code, .. }) => assert_eq!(code, 4300),
        other => panic!("n3's subscriber: expected close 4300, got {other:?}"),
    }
    // The lame duck: announced Leaving, its links kept while its drain runs.
    await_tables(
        &[("n1", &nodes[0].1), ("n2", &nodes[1].1)],
        "n3 leaving with its links up",
        |_, t| {
            t.get("n3")
                .is_some_and(|(s, link, _)| s == "leaving" && *link)
        },
    )
    .await;
    let (status, text) = nodes[0].1.api_publish(TOPIC, "during", json!(1)).await;
    assert_eq!(status, 200, "{text}");
    for (i, s) in subs.iter_mut().take(2).enumerate() {
        let (event, _) = next_publication(s, &format!("n{} during n3's drain", i + 1)).await;
        assert_eq!(event, "during");
    }
    // The drain's end: it leaves (never dead, never redialled) and exits cleanly.
    await_tables(
        &[("n1", &nodes[0].1), ("n2", &nodes[1].1)],
        "n3 left",
        |_, t| t.get("n3").is_some_and(|(s, link, _)| s == "left" && !link),
    )
    .await;
    assert!(
        nodes[2].1.wait_exit(CONVERGE).is_some_and(|s| s.success()),
        "{}",
        nodes[2].1.log()
    );
    for w in [&nodes[0].1, &nodes[1].1] {
        assert!(
            !w.log().contains("cluster member n3 is dead"),
            "{}",
            w.log()
        );
    }
    let (status, text) = nodes[1].1.api_publish(TOPIC, "after", json!(2)).await;
    assert_eq!(status, 200, "{text}");
    for (i, s) in subs.iter_mut().take(2).enumerate() {
        let (event, _) = next_publication(s, &format!("n{} after n3 left", i + 1)).await;
        assert_eq!(event, "after");
    }
}

/// A node as [`meshed`] starts them: two shards, the test PSK, `seeds` (comma-separated) if any.
fn mesh_node(name: &str, listen: &str, seeds: &str) -> Wse {
    let mut args = vec![
        "--cores",
        "2",
        "--cluster-enabled",
        "true",
        "--cluster-security",
        "psk",
        "--cluster-psk",
        PSK,
        "--cluster-node-name",
        name,
        "--cluster-listen",
        listen,
    ];
    if !seeds.is_empty() {
        args.extend(["--cluster-seeds", seeds]);
    }
    Wse::start(&args)
}

#[tokio::test(flavor = "current_thread")]
async fn a_killed_node_is_dead_the_rest_keep_serving_and_it_rejoins_when_restarted() {
    const TOPIC: &str = "room";
    let mut nodes = three_nodes().await;
    let seed = view(&nodes[0].1).await["node"]["advertised"]
        .as_str()
        .unwrap()
        .to_owned();
    let v3 = view(&nodes[2].1).await;
    let addr3 = v3["node"]["advertised"].as_str().unwrap().to_owned();
    let first_incarnation = v3["node"]["incarnation"].as_u64().unwrap();
    let mut subs = Vec::new();
    for (name, w) in nodes.iter().take(2) {
        let mut s = client(w, &format!("sub-{name}"), false).await;
        subscribed(&mut s, TOPIC).await;
        subs.push(s);
    }
    // kill -9 (dropping a Wse kills it with SIGKILL).
    drop(nodes.pop());
    let survivors = [("n1", &nodes[0].1), ("n2", &nodes[1].1)];
    await_tables(&survivors, "n3 dead, n1 and n2 still linked", |me, t| {
        let other = if me == "n1" { "n2" } else { "n1" };
        t.get("n3").is_some_and(|(s, link, _)| s == "dead" && !link)
            && t.get(other)
                .is_some_and(|(s, link, _)| s == "alive" && *link)
    })
    .await;
    let (status, text) = nodes[0].1.api_publish(TOPIC, "without-n3", json!(1)).await;
    assert_eq!(status, 200, "{text}");
    for (i, s) in subs.iter_mut().enumerate() {
        let (event, _) = next_publication(s, &format!("n{} with n3 dead", i + 1)).await;
        assert_eq!(event, "without-n3");
    }
    // The same name and address again: a new incarnation, alive everywhere.
    let n3 = mesh_node("n3", &addr3, &seed);
    let all = [survivors[0], survivors[1], ("n3", &n3)];
    await_tables(&all, "n3 rejoined, full mesh", |me, t| {
        ["n1", "n2", "n3"]
            .iter()
            .filter(|n| **n != me)
            .all(|n| t.get(*n).is_some_and(|(s, link, _)| s == "alive" && *link))
    })
    .await;
    let v = view(&nodes[0].1).await;
    let seen = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "n3")
        .and_then(|m| m["incarnation"].as_u64())
        .unwrap();
    assert!(seen > first_incarnation, "{v}");
    // Publications cross to it again, and from it.
    let mut sub3 = client(&n3, "sub-n3", false).await;
    subscribed(&mut sub3, TOPIC).await;
    let (status, text) = nodes[0].1.api_publish(TOPIC, "to-n3", json!(2)).await;
    assert_eq!(status, 200, "{text}");
    let (event, _) = next_publication(&mut sub3, "n3 after rejoining").await;
    assert_eq!(event, "to-n3");
    let (status, text) = n3.api_publish(TOPIC, "from-n3", json!(3)).await;
    assert_eq!(status, 200, "{text}");
    for (i, s) in subs.iter_mut().enumerate() {
        let (event, _) = next_publication(s, &format!("n{}: to-n3 first", i + 1)).await;
        assert_eq!(event, "to-n3");
        let (event, _) = next_publication(s, &format!("n{}: from the rejoined n3", i + 1)).await;
        assert_eq!(event, "from-n3");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_published_python_client_on_each_node_gets_what_the_others_publish() {
    const TOPIC: &str = "py-room";
    let python = support::venv_python();
    let nodes = three_nodes().await;
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python/cluster_subscriber.py");
    let mut children = Vec::new();
    let mut lines = Vec::new();
    for (name, w) in &nodes {
        let mut child = Command::new(&python)
            .arg(&script)
            .arg(w.url())
            .arg(token(&format!("py-{name}"), json!({})))
            .arg(TOPIC)
            .arg(nodes.len().to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start cluster_subscriber.py");
        let stderr = support::collect_stderr(&mut child);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        support::for_each_line(child.stdout.take().unwrap(), move |line| {
            tx.send(line).is_ok()
        });
        children.push((name.clone(), child, stderr));
        lines.push(rx);
    }
    async fn next_line(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        what: &str,
        stderr: &std::sync::Mutex<String>,
    ) -> String {
        match tokio::time::timeout(CONVERGE, rx.recv()).await {
            Ok(Some(line)) => line,
            _ => panic!("{what}: nothing more; stderr: {}", stderr.lock().unwrap()),
        }
    }
    for ((name, _, stderr), rx) in children.iter().zip(lines.iter_mut()) {
        let line = next_line(rx, &format!("python on {name}"), stderr).await;
        assert_eq!(line, "SUBSCRIBED", "python on {name}");
    }
    // One publication made on each node: every subscriber gets all three, two of them from the
    // other nodes, each once.
    for (name, w) in &nodes {
        let (status, text) = w
            .api_publish(TOPIC, &format!("from-{name}"), json!({"node": name}))
            .await;
        assert_eq!(status, 200, "{text}");
    }
    for ((name, child, stderr), rx) in children.iter_mut().zip(lines.iter_mut()) {
        let mut got = Vec::new();
        for _ in 0..nodes.len() {
            got.push(next_line(rx, &format!("python on {name}"), stderr).await);
        }
        got.sort();
        let want: Vec<String> = ["n1", "n2", "n3"]
            .iter()
            .map(|n| format!("GOT from-{n} {{\"node\": \"{n}\"}}"))
            .collect();
        assert_eq!(got, want, "python on {name}");
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "python on {name}: {}",
            stderr.lock().unwrap()
        );
    }
}
