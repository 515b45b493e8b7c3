//! The controller's side of distributed runs: connections to the agents, the split, and one
//! started run ([`RemoteRun`]) that a scenario's coordinator drives through [`crate::fleet::Fleet`].
//!
//! Each agent link has a reader thread that keeps the agent's latest progress, start
//! confirmation, result or error in a mutex with a condition variable, so the coordinator waits
//! on events (all started, all results in) rather than polling sockets.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

use super::proto::{self, FromAgent, ToAgent};
use super::{split_by_budget, split_pool};
use crate::fleet::{Loadgen, Slice, Snapshot};
use crate::report::Report;
use crate::scenarios::{Phase, Setup, stop_requested};
use crate::sys;

/// Time to connect to an agent and get its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Time every agent has to plan its slice (mint tokens, start threads) and confirm.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Time every agent has to close its connections and send its figures.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

/// What an agent said about itself.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    pub addr: String,
    pub host: String,
    pub nofile: u64,
    pub cores: usize,
    pub threads: usize,
    pub sources: usize,
}

impl AgentInfo {
    /// Connections it can hold: its descriptor limit less what the process needs besides.
    pub fn budget(&self) -> u64 {
        self.nofile.saturating_sub(sys::NOFILE_RESERVE)
    }
}

/// One slice's figures as an agent sent them.
pub struct Outcome {
    pub part: serde_json::Value,
    pub loadgen: Loadgen,
}

#[derive(Default)]
struct LinkState {
    snapshot: Snapshot,
    started: bool,
    result: Option<Outcome>,
    /// An error message from the agent, or why the link broke.
    error: Option<String>,
    lost: bool,
}

struct Link {
    info: AgentInfo,
    writer: Mutex<TcpStream>,
    state: Mutex<LinkState>,
    changed: Condvar,
}

impl Link {
    fn state(&self) -> MutexGuard<'_, LinkState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, msg: &ToAgent) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = proto::write_msg(&mut *w, msg) {
            let mut s = self.state();
            s.lost = true;
            s.error.get_or_insert_with(|| format!("send failed: {e}"));
            self.changed.notify_all();
        }
    }

    /// Waits until `done(state)` or `deadline`; returns whether it became true.
    fn wait(&self, deadline: Instant, done: impl Fn(&LinkState) -> bool) -> bool {
        let mut s = self.state();
        loop {
            if done(&s) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reads the agent's messages until the link closes.
    fn read_loop(self: Arc<Self>, mut stream: TcpStream) {
        loop {
            let msg = proto::read_msg::<FromAgent>(&mut stream);
            let mut s = self.state();
            match msg {
                Ok(FromAgent::Progress(p)) => s.snapshot = p,
                Ok(FromAgent::Started { .. }) => s.started = true,
                Ok(FromAgent::Result { part, loadgen }) => {
                    s.result = Some(Outcome { part, loadgen });
                }
                Ok(FromAgent::Error { message }) => {
                    s.error.get_or_insert(message);
                }
                Ok(FromAgent::Hello { .. }) => {
                    s.error.get_or_insert_with(|| "unexpected hello".into());
                }
                Err(e) => {
                    s.lost = true;
                    s.error
                        .get_or_insert_with(|| format!("connection lost: {e}"));
                    self.changed.notify_all();
                    return;
                }
            }
            self.changed.notify_all();
        }
    }
}

/// Connected agents, before a run.
pub struct Agents {
    links: Vec<Arc<Link>>,
}

impl Agents {
    /// Connects to every agent and reads its hello.
    ///
    /// # Errors
    /// An agent is unreachable, silent, busy, or speaks another protocol version.
    pub fn connect(addrs: &[String]) -> anyhow::Result<Self> {
        let mut links = Vec::with_capacity(addrs.len());
        for addr in addrs {
            links.push(Arc::new(
                connect_one(addr).with_context(|| format!("agent {addr}"))?,
            ));
        }
        Ok(Self { links })
    }

    pub fn infos(&self) -> Vec<AgentInfo> {
        self.links.iter().map(|l| l.info.clone()).collect()
    }

    /// Splits `n` connections by the agents' budgets, starts `scenario` on each and waits for
    /// every confirmation. Adds the split to the report (`agents`, `agent_shares`) and a note
    /// when the budgets cannot hold `n`.
    ///
    /// # Errors
    /// An agent refused or did not confirm in time (the others are stopped).
    pub fn start(
        &self,
        setup: &Setup,
        scenario: &str,
        args: &impl Serialize,
        n: usize,
        report: &mut Report,
    ) -> anyhow::Result<RemoteRun> {
        let budgets: Vec<u64> = self.links.iter().map(|l| l.info.budget()).collect();
        let shares = split_by_budget(n, &budgets);
        let total: u64 = budgets.iter().sum();
        if n as u64 > total {
            report.note(format!(
                "{n} connections exceed the agents' descriptor budgets ({total} in all): \
                 every agent is asked for more than it can open"
            ));
        }
        // Agents without a pool of their own share the controller's, in disjoint chunks.
        let pools = split_pool(setup.sources(), self.links.len());
        let common = serde_json::to_value(&setup.common).expect("flags serialise");
        let args = serde_json::to_value(args).expect("flags serialise");
        let mut offset = 0;
        let mut described = Vec::new();
        for ((link, &count), pool) in self.links.iter().zip(&shares).zip(pools) {
            *link.state() = LinkState::default();
            let sources = (link.info.sources == 0 && !pool.is_empty()).then(|| {
                pool.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            });
            link.send(&ToAgent::Start {
                scenario: scenario.to_owned(),
                common: common.clone(),
                args: args.clone(),
                secret: setup.common.secret.clone(),
                slice: Slice { offset, count },
                sources,
            });
            described.push(format!("{}={count}", link.info.addr));
            offset += count;
        }
        report.set("agents", self.links.len());
        report.set("agent_shares", described.join(", "));
        setup.log(&format!("agents: {}", described.join(", ")));
        let run = RemoteRun {
            links: self.links.clone(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        for link in &self.links {
            let ok = link.wait(deadline, |s| s.started || s.error.is_some() || s.lost);
            let s = link.state();
            if !ok || !s.started {
                let why = s.error.clone().unwrap_or_else(|| "no confirmation".into());
                drop(s);
                run.abort();
                bail!("agent {}: {why}", link.info.addr);
            }
        }
        Ok(run)
    }
}

fn connect_one(addr: &str) -> anyhow::Result<Link> {
    let sock: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .context("resolves to nothing")?;
    let mut stream = TcpStream::connect_timeout(&sock, HELLO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    proto::write_msg(
        &mut stream,
        &ToAgent::Hello {
            version: proto::VERSION,
        },
    )?;
    let info = match proto::read_msg::<FromAgent>(&mut stream)? {
        FromAgent::Hello {
            version,
            host,
            nofile,
            cores,
            threads,
            sources,
            ..
        } => {
            if version != proto::VERSION {
                bail!(
                    "protocol version {version}, this controller speaks {}",
                    proto::VERSION
                );
            }
            AgentInfo {
                addr: addr.to_owned(),
                host,
                nofile,
                cores,
                threads,
                sources,
            }
        }
        FromAgent::Error { message } => bail!("{message}"),
        other => bail!("unexpected first message {other:?}"),
    };
    stream.set_read_timeout(None)?;
    let link = Link {
        info,
        writer: Mutex::new(stream.try_clone()?),
        state: Mutex::default(),
        changed: Condvar::new(),
    };
    Ok(link)
}

impl Agents {
    /// Starts the reader threads (separate from `connect` so a failed connect leaks none).
    pub fn listen(&self) -> anyhow::Result<()> {
        for link in &self.links {
            let stream = link
                .writer
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .try_clone()?;
            let reader = link.clone();
            std::thread::Builder::new()
                .name(format!("agent-{}", link.info.addr))
                .spawn(move || reader.read_loop(stream))?;
        }
        Ok(())
    }
}

impl Drop for Agents {
    /// Ends every session: the agents see the connection close and wait for the next
    /// controller, and the reader threads (which hold the links) see EOF and end.
    fn drop(&mut self) {
        for link in &self.links {
            let w = link.writer.lock().unwrap_or_else(|e| e.into_inner());
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// One run started on every agent.
pub struct RemoteRun {
    links: Vec<Arc<Link>>,
}

impl RemoteRun {
    /// Sends the phase to every agent, back to back.
    pub fn set_phase(&self, phase: Phase) {
        for link in &self.links {
            link.send(&ToAgent::Phase { phase });
        }
    }

    /// The agents' latest progress, summed.
    pub fn snapshot(&self) -> Snapshot {
        let mut all = Snapshot::default();
        for link in &self.links {
            all.add(&link.state().snapshot);
        }
        all
    }

    /// Stops every agent and collects its figures. An agent that is lost or silent is left
    /// out with a note, and the run marked partial.
    pub fn finish(self, report: &mut Report) -> Vec<(String, Outcome)> {
        for link in &self.links {
            link.send(&ToAgent::Finish);
        }
        let deadline = Instant::now() + FINISH_TIMEOUT;
        let mut out = Vec::new();
        for link in &self.links {
            link.wait(deadline, |s| s.result.is_some() || s.lost);
            let mut s = link.state();
            match s.result.take() {
                Some(o) => out.push((link.info.addr.clone(), o)),
                None => {
                    let why = s
                        .error
                        .clone()
                        .unwrap_or_else(|| "no result in time".into());
                    report.note(format!(
                        "agent {}: {why}; its connections are missing from the figures",
                        link.info.addr
                    ));
                    report.partial = true;
                }
            }
            if let Some(e) = s.error.take()
                && !s.lost
            {
                report.note(format!("agent {}: {e}", link.info.addr));
            }
        }
        if stop_requested() {
            report.partial = true;
        }
        out
    }

    /// Stops every agent and drops what they send (a failed start).
    fn abort(&self) {
        for link in &self.links {
            link.send(&ToAgent::Finish);
        }
    }
}
