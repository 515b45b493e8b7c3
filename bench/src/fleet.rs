//! The load-generating half of a scenario, in this process or spread over agents.
//!
//! A scenario that can run distributed is split in two:
//! - a [`Workload`]: opens one *slice* of the connections (global indexes `offset..offset+count`)
//!   on worker threads, follows the phases it is given, and at the end returns a `Part`: its
//!   counters and histograms, serialisable and mergeable without loss;
//! - the scenario's coordinator (its `run`), which talks to a [`Fleet`]: it waits on summed
//!   progress, moves every slice through the phases together, samples the server, and turns the
//!   merged `Part` into figures.
//!
//! Locally the fleet is one slice with every connection. With `--agents` the controller splits
//! the connections by each agent's descriptor budget ([`crate::dist::split_by_budget`]), each
//! agent runs its slice of the same `Workload` code, and the coordinator cannot tell the
//! difference except for the per-agent notes.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::dist::controller::RemoteRun;
use crate::report::Report;
use crate::scenarios::{LoadCpu, Phase, Progress, Setup, Shared};
use crate::sys;

/// Which connections one process opens: global indexes `offset..offset + count`. Indexes decide
/// subjects, topics and targets, so a slice behaves exactly like that range of a local run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    pub offset: usize,
    pub count: usize,
}

/// A scenario's load-generating half (see the module docs).
pub trait Workload: 'static {
    /// The subcommand name; agents are told which workload to run by it.
    const NAME: &'static str;
    type Args: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;
    /// One slice's figures; merged with [`Workload::merge`].
    type Part: Serialize + DeserializeOwned + Default + Send + 'static;
    /// Connections the whole scenario opens (what is split between agents).
    fn connections(args: &Self::Args) -> usize;
    /// Starts worker threads for `slice`; they open connections right away or at the phase
    /// the workload waits for.
    fn start(setup: &Setup, args: &Self::Args, slice: Slice) -> Running<Self::Part>;
    /// Adds `other` (another slice's figures) to `into`.
    fn merge(into: &mut Self::Part, other: Self::Part);
}

/// Progress counters of a slice or, summed, of the fleet.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub opened: u64,
    pub ready: u64,
    pub failed: u64,
    pub closed: u64,
    pub messages: u64,
}

impl Snapshot {
    pub fn add(&mut self, o: &Snapshot) {
        self.opened += o.opened;
        self.ready += o.ready;
        self.failed += o.failed;
        self.closed += o.closed;
        self.messages += o.messages;
    }

    /// Connections done with their setup, either way.
    pub fn settled(&self) -> u64 {
        self.ready + self.failed
    }

    /// `opened/ready/failed/closed` for progress lines.
    pub fn line(&self, total: usize) -> String {
        format!(
            "connections opened {}/{total}, ready {}, failed {}, closed {}, messages {}",
            self.opened, self.ready, self.failed, self.closed, self.messages
        )
    }
}

/// The load generator's own CPU over the measured window of one process.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Loadgen {
    /// Who measured it: `local` or the agent's address.
    pub name: String,
    /// Cores the process used.
    pub cores: f64,
    /// The busiest worker thread's share of one core.
    pub busiest: f64,
    /// Cores the process may use.
    pub usable: usize,
}

impl Loadgen {
    fn saturated(&self) -> bool {
        self.busiest > 0.9 || self.cores > 0.9 * self.usable as f64
    }
}

/// Adds the load-generator figures of every process: cores used (summed) and the busiest thread
/// anywhere, with a note per (nearly) saturated process.
pub fn loadgen_figures(report: &mut Report, all: &[Loadgen]) {
    report.set(
        "loadgen_cpu_cores",
        all.iter().map(|l| l.cores).sum::<f64>(),
    );
    report.set(
        "loadgen_busiest_thread_util",
        all.iter().map(|l| l.busiest).fold(0.0, f64::max),
    );
    for l in all.iter().filter(|l| l.saturated()) {
        let who = if all.len() > 1 {
            format!(" ({})", l.name)
        } else {
            String::new()
        };
        report.note(format!(
            "load generator{who} near saturation (busiest thread {:.0}% of a core, process \
             {:.2} cores): figures are a lower bound for the server",
            l.busiest * 100.0,
            l.cores
        ));
    }
}

/// One slice's worker threads in this process.
pub struct Running<P> {
    shared: Arc<Shared>,
    tids: Arc<Mutex<Vec<u32>>>,
    /// The measured window's CPU, started when the phase reaches `Measure`.
    cpu: Mutex<Option<LoadCpu>>,
    join: Box<dyn FnOnce() -> P + Send>,
}

impl<P> Running<P> {
    /// Wraps started workers: `join` sets nothing, it only joins them and merges their figures
    /// (the phase is already `Stop` when it is called).
    pub fn new(
        shared: Arc<Shared>,
        tids: Arc<Mutex<Vec<u32>>>,
        join: impl FnOnce() -> P + Send + 'static,
    ) -> Self {
        Self {
            shared,
            tids,
            cpu: Mutex::new(None),
            join: Box::new(join),
        }
    }

    pub fn set_phase(&self, p: Phase) {
        if p >= Phase::Measure {
            let mut cpu = self.cpu.lock().unwrap_or_else(|e| e.into_inner());
            if cpu.is_none() {
                *cpu = Some(LoadCpu::start(
                    &self.tids.lock().unwrap_or_else(|e| e.into_inner()),
                ));
            }
        }
        self.shared.set_phase(p);
    }

    pub fn snapshot(&self) -> Snapshot {
        let p = &self.shared.progress;
        Snapshot {
            opened: Progress::get(&p.opened),
            ready: Progress::get(&p.ready),
            failed: Progress::get(&p.failed),
            closed: Progress::get(&p.closed),
            messages: Progress::get(&p.messages),
        }
    }

    /// Stops the workers and returns their merged figures and the measured window's CPU.
    pub fn finish(self, name: &str) -> (P, Loadgen) {
        let (cores, busiest) = self
            .cpu
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map_or((0.0, 0.0), |c| c.measure());
        self.shared.set_phase(Phase::Stop);
        let part = (self.join)();
        let loadgen = Loadgen {
            name: name.to_owned(),
            cores,
            busiest,
            usable: sys::usable_cores(),
        };
        (part, loadgen)
    }
}

/// A workload started without its type: what an agent holds between messages.
pub trait ErasedRun: Send {
    fn set_phase(&self, p: Phase);
    fn snapshot(&self) -> Snapshot;
    /// Stops, joins, and returns the part as JSON.
    fn finish(self: Box<Self>) -> (serde_json::Value, Loadgen);
}

impl<P: Serialize + Send + 'static> ErasedRun for Running<P> {
    fn set_phase(&self, p: Phase) {
        Running::set_phase(self, p);
    }
    fn snapshot(&self) -> Snapshot {
        Running::snapshot(self)
    }
    fn finish(self: Box<Self>) -> (serde_json::Value, Loadgen) {
        let (part, loadgen) = Running::finish(*self, "agent");
        (
            serde_json::to_value(part).expect("parts serialise"),
            loadgen,
        )
    }
}

/// Starts workload `W` from JSON arguments (what an agent receives).
///
/// # Errors
/// The arguments do not parse as `W::Args`.
pub fn start_erased<W: Workload>(
    setup: &Setup,
    args: serde_json::Value,
    slice: Slice,
) -> anyhow::Result<Box<dyn ErasedRun>> {
    let args: W::Args = serde_json::from_value(args)?;
    Ok(Box::new(W::start(setup, &args, slice)))
}

/// The whole load generator of one run: this process, or agents.
pub enum Fleet<W: Workload> {
    Local(Running<W::Part>),
    Remote(RemoteRun, PhantomData<W>),
}

impl<W: Workload> Fleet<W> {
    /// Starts every connection here, or (with `--agents`) splits them between the agents and
    /// starts them all; returns `None` with a note when the agents cannot start.
    pub fn start(setup: &Setup, args: &W::Args, report: &mut Report) -> Option<Self> {
        let n = W::connections(args);
        match &setup.agents {
            None => {
                setup.check_nofile(n, report);
                Some(Fleet::Local(W::start(
                    setup,
                    args,
                    Slice {
                        offset: 0,
                        count: n,
                    },
                )))
            }
            Some(agents) => match agents.start(setup, W::NAME, args, n, report) {
                Ok(run) => Some(Fleet::Remote(run, PhantomData)),
                Err(e) => {
                    let msg = format!("agents could not start {}: {e:#}", W::NAME);
                    setup.log(&msg);
                    report.note(msg);
                    report.partial = true;
                    None
                }
            },
        }
    }

    /// Every slice moves to `p` (agents in the order they are listed, back to back).
    pub fn set_phase(&self, p: Phase) {
        match self {
            Fleet::Local(r) => r.set_phase(p),
            Fleet::Remote(r, _) => r.set_phase(p),
        }
    }

    /// Progress summed over slices.
    pub fn snapshot(&self) -> Snapshot {
        match self {
            Fleet::Local(r) => r.snapshot(),
            Fleet::Remote(r, _) => r.snapshot(),
        }
    }

    /// Stops every slice and returns the merged figures; adds the load-generator figures and,
    /// for agents, their shares and any agent that was lost (the run is then partial).
    pub fn finish(self, report: &mut Report) -> W::Part {
        match self {
            Fleet::Local(r) => {
                let (part, loadgen) = r.finish("local");
                loadgen_figures(report, &[loadgen]);
                part
            }
            Fleet::Remote(r, _) => {
                let mut merged = W::Part::default();
                let mut loadgens = Vec::new();
                for (agent, outcome) in r.finish(report) {
                    match serde_json::from_value::<W::Part>(outcome.part) {
                        Ok(part) => W::merge(&mut merged, part),
                        Err(e) => {
                            report.note(format!("agent {agent}: unreadable result: {e}"));
                            report.partial = true;
                        }
                    }
                    loadgens.push(Loadgen {
                        name: agent,
                        ..outcome.loadgen
                    });
                }
                loadgen_figures(report, &loadgens);
                merged
            }
        }
    }
}
