//! Process assembly: what a long-running command starts around the engine
//! ([`serve`]: telemetry, the HTTP and SQL endpoints, the view) and the demo
//! ([`demo`]: the whole flow on an embedded broker). Nothing in the crate imports
//! this room; `main.rs` (the CLI) does.

pub mod demo;
pub mod federate;
pub mod serve;
#[cfg(test)]
mod golden_tests;
