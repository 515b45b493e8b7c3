//! `wse-bench agent --listen ADDR`: runs slices of scenarios for a controller.
//!
//! The control connection is served by a current-thread tokio runtime; the workload itself runs
//! on its own worker threads exactly as in a local run ([`crate::fleet::Running`]). One
//! controller at a time: a second one waits up to `BUSY_GRACE` for the first to go (a script
//! running scenarios back to back connects the next controller while this agent may not have
//! seen the previous one's close yet), and is then told the agent is busy. Ctrl-C (or SIGTERM) stops the
//! current slice, sends its partial figures to the controller, and exits.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::proto::{self, FromAgent, ToAgent};
use crate::fleet::{ErasedRun, Snapshot};
use crate::scenarios::{self, Common, Phase, Setup};
use crate::sys;

/// How often the agent reports progress while it changes.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// The agent's own flags.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentArgs {
    /// Address to accept the controller on, e.g. 0.0.0.0:7070 (a private network: the protocol
    /// is unauthenticated).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Worker threads (default: the controller's --threads, else every usable core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// This machine's source addresses (as the scenarios' --source); without it the agent
    /// uses its share of the controller's pool.
    #[arg(long, default_value = "")]
    pub source: String,
    /// Print nothing but errors.
    #[arg(long)]
    pub quiet: bool,
}

/// Binds `--listen` and serves controllers until Ctrl-C.
///
/// # Errors
/// The address cannot be bound, or the `--source` pool is malformed.
pub fn run(args: &AgentArgs) -> anyhow::Result<()> {
    let listener = std::net::TcpListener::bind(args.listen)?;
    serve(listener, args)
}

/// Serves controllers on `listener` until Ctrl-C (tests start agents this way, in threads).
///
/// # Errors
/// The listener cannot be used, or the `--source` pool is malformed.
pub fn serve(listener: std::net::TcpListener, args: &AgentArgs) -> anyhow::Result<()> {
    let pool = sys::parse_source_pool(&args.source)?;
    let nofile = sys::raise_nofile_limit();
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::from_std(listener)?;
        let agent = Agent {
            args: args.clone(),
            pool_len: pool.len(),
            nofile,
        };
        agent.log(&format!(
            "listening on {} (RLIMIT_NOFILE {nofile}, {} cores, {} source addresses)",
            listener.local_addr()?,
            sys::usable_cores(),
            pool.len()
        ));
        let mut stop = std::pin::pin!(stopped());
        let mut next = None;
        loop {
            let (stream, peer) = match next.take() {
                Some(waiting) => waiting,
                None => tokio::select! {
                    r = listener.accept() => r?,
                    () = stop.as_mut() => return Ok(()),
                },
            };
            agent.log(&format!("controller {peer} connected"));
            match agent.session(stream, &listener, stop.as_mut()).await {
                Ended::Closed(why, waiting) => {
                    agent.log(&format!("controller {peer} gone: {why}"));
                    next = waiting;
                }
                Ended::Exit => return Ok(()),
            }
        }
    })
}

/// Resolves on the first Ctrl-C or SIGTERM.
async fn stopped() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending().await,
            }
        } => {}
    }
}

/// How long a second controller waits for the current one's session to end before it is told
/// the agent is busy.
const BUSY_GRACE: Duration = Duration::from_secs(2);

enum Ended {
    /// The controller went away (why); a controller that was waiting is served next.
    Closed(String, Option<(TcpStream, SocketAddr)>),
    Exit,
}

struct Agent {
    args: AgentArgs,
    pool_len: usize,
    nofile: u64,
}

/// The slice a session runs.
struct Current {
    run: Box<dyn ErasedRun>,
    last: Snapshot,
}

impl Agent {
    fn log(&self, line: &str) {
        if !self.args.quiet {
            eprintln!("[agent] {line}");
        }
    }

    fn hello(&self) -> FromAgent {
        let cores = sys::usable_cores();
        FromAgent::Hello {
            version: proto::VERSION,
            wse_bench_version: env!("CARGO_PKG_VERSION").into(),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or_else(|_| "?".into(), |h| h.trim().to_owned()),
            nofile: self.nofile,
            cores,
            threads: self.args.threads.unwrap_or(cores),
            sources: self.pool_len,
        }
    }

    /// Serves one controller until it goes away, or until `stop` (Ctrl-C): then the current
    /// slice is finished and its partial figures sent before the agent exits.
    async fn session(
        &self,
        stream: TcpStream,
        listener: &TcpListener,
        mut stop: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Ended {
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        // Frames are read by a task of their own: reading is not cancel-safe, the select is.
        let (tx, mut rx) = mpsc::channel::<std::io::Result<ToAgent>>(16);
        let reader = tokio::spawn(async move {
            loop {
                let msg = proto::read_msg_async::<ToAgent>(&mut rd).await;
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
        });
        let mut session = Session {
            agent: self,
            current: None,
        };
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut exiting = false;
        // A second controller, waiting until this session ends or its grace runs out.
        let mut waiting: Option<(TcpStream, SocketAddr, tokio::time::Instant)> = None;
        let ended = loop {
            let out = tokio::select! {
                () = &mut stop, if !exiting => {
                    exiting = true;
                    self.log("interrupted: stopping the current run");
                    let mut out = Vec::new();
                    if session.current.is_some() {
                        out.push(error("agent interrupted (Ctrl-C): its figures are partial"));
                        out.extend(session.finish());
                    }
                    out
                }
                msg = rx.recv() => match msg {
                    Some(Ok(msg)) => session.handle(msg),
                    Some(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        break Ended::Closed("connection closed".into(), None);
                    }
                    Some(Err(e)) => break Ended::Closed(e.to_string(), None),
                    None => break Ended::Closed("connection closed".into(), None),
                },
                _ = tick.tick() => session.progress(),
                busy = listener.accept() => {
                    if let Ok((s, peer)) = busy {
                        match waiting {
                            None => {
                                let deadline = tokio::time::Instant::now() + BUSY_GRACE;
                                waiting = Some((s, peer, deadline));
                            }
                            Some(_) => self.refuse(s, peer).await,
                        }
                    }
                    Vec::new()
                }
                () = async {
                    match &waiting {
                        Some((_, _, deadline)) => tokio::time::sleep_until(*deadline).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((s, peer, _)) = waiting.take() {
                        self.refuse(s, peer).await;
                    }
                    Vec::new()
                }
            };
            let mut failed = None;
            for msg in out {
                if let Err(e) = proto::write_msg_async(&mut wr, &msg).await {
                    failed = Some(e.to_string());
                    break;
                }
            }
            if let Some(e) = failed {
                break Ended::Closed(e, None);
            }
            if exiting {
                break Ended::Exit;
            }
        };
        reader.abort();
        match ended {
            Ended::Closed(why, _) => Ended::Closed(why, waiting.map(|(s, peer, _)| (s, peer))),
            Ended::Exit => {
                if let Some((s, peer, _)) = waiting {
                    self.refuse(s, peer).await;
                }
                Ended::Exit
            }
        }
    }

    /// Tells a second controller this agent is serving another one.
    async fn refuse(&self, mut s: TcpStream, peer: SocketAddr) {
        self.log(&format!("refusing controller {peer}: busy"));
        let _ = proto::write_msg_async(
            &mut s,
            &FromAgent::Error {
                message: "busy with another controller".into(),
            },
        )
        .await;
    }
}

/// A controller's session: at most one slice running.
struct Session<'a> {
    agent: &'a Agent,
    current: Option<Current>,
}

impl Session<'_> {
    /// Answers one message with the messages to send back.
    fn handle(&mut self, msg: ToAgent) -> Vec<FromAgent> {
        match msg {
            ToAgent::Hello { version } => {
                if version != proto::VERSION {
                    return vec![FromAgent::Error {
                        message: format!(
                            "protocol version {version}, this agent speaks {}",
                            proto::VERSION
                        ),
                    }];
                }
                vec![self.agent.hello()]
            }
            ToAgent::Start {
                scenario,
                common,
                args,
                secret,
                slice,
                sources,
            } => {
                if self.current.is_some() {
                    return vec![error("a run is already in progress")];
                }
                let setup = match self.setup(common, secret, sources) {
                    Ok(s) => s,
                    Err(e) => return vec![error(format!("{e:#}"))],
                };
                self.agent.log(&format!(
                    "{scenario}: connections {}..{} on {} threads",
                    slice.offset,
                    slice.offset + slice.count,
                    setup.threads
                ));
                match scenarios::start_part(&scenario, &setup, args, slice) {
                    Ok(run) => {
                        self.current = Some(Current {
                            run,
                            last: Snapshot::default(),
                        });
                        vec![FromAgent::Started {
                            threads: setup.threads,
                        }]
                    }
                    Err(e) => vec![error(format!("{e:#}"))],
                }
            }
            ToAgent::Phase { phase } => match &self.current {
                Some(c) => {
                    c.run.set_phase(phase);
                    Vec::new()
                }
                None => vec![error("no run to move to another phase")],
            },
            ToAgent::Finish => self.finish(),
        }
    }

    fn setup(
        &self,
        common: serde_json::Value,
        secret: String,
        sources: Option<String>,
    ) -> anyhow::Result<Setup> {
        let mut common: Common = serde_json::from_value(common)?;
        common.secret = secret;
        common.quiet = true;
        if self.agent.args.threads.is_some() {
            common.threads = self.agent.args.threads;
        }
        if self.agent.pool_len > 0 {
            common.source = self.agent.args.source.clone();
        } else if let Some(s) = sources {
            common.source = s;
        }
        Setup::for_agent(common)
    }

    /// The progress message, when something changed since the last one.
    fn progress(&mut self) -> Vec<FromAgent> {
        let Some(c) = &mut self.current else {
            return Vec::new();
        };
        let now = c.run.snapshot();
        if now == c.last {
            return Vec::new();
        }
        c.last = now;
        vec![FromAgent::Progress(now)]
    }

    /// Stops the slice: the last progress, then the figures.
    fn finish(&mut self) -> Vec<FromAgent> {
        let Some(c) = self.current.take() else {
            return vec![error("no run to finish")];
        };
        let last = c.run.snapshot();
        let (part, loadgen) = c.run.finish();
        self.agent.log(&format!(
            "finished: {} opened, {} ready, {} failed, {} closed",
            last.opened, last.ready, last.failed, last.closed
        ));
        vec![
            FromAgent::Progress(last),
            FromAgent::Result { part, loadgen },
        ]
    }
}

impl Drop for Session<'_> {
    /// A session that ends with a slice still running (controller gone, Ctrl-C) stops it: its
    /// connections close and its threads end before the agent goes on.
    fn drop(&mut self) {
        if let Some(c) = self.current.take() {
            c.run.set_phase(Phase::Stop);
            let _ = c.run.finish();
            self.agent.log("run abandoned: its connections are closed");
        }
    }
}

fn error(message: impl Into<String>) -> FromAgent {
    FromAgent::Error {
        message: message.into(),
    }
}
