//! wse-bench: the load generator and benchmark harness for wse-server, which runs the same
//! scenarios against the upstream WSE server so the two can be compared in one run.
//!
//! Reading order: [`cli`] (the commands and flags), [`scenarios`] (the shared machinery, then
//! one module per scenario), [`conn`] (the lean client connection), [`wire`] (the JSON it sends
//! and scans), [`centrifuge`] (the Centrifuge client framing), [`stats`] and [`search`] (what is measured and how rates are searched),
//! [`report`] (tables, JSON, compare, HTML), [`sys`] and [`clock`] (the OS and the time base).
//! Distributed runs: [`fleet`] (a scenario's load-generating half, local or on agents) and
//! [`dist`] (the agent, the controller and their protocol).

pub mod centrifuge;
pub mod cli;
pub mod clock;
pub mod conn;
pub mod dist;
pub mod engine;
pub mod fleet;
pub mod html;
pub mod report;
pub mod scenarios;
pub mod search;
pub mod stats;
pub mod sys;
pub mod wire;
