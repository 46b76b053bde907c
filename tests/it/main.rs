//! twinguard's integration tests: ONE binary of modules, so the heavy dependencies
//! link once. Every test here talks to a real Kafka-compatible broker process
//! (tansu) that the harness starts on a free port and stops afterwards.

mod harness;

mod cli;
mod crash;
mod detect;
mod e2e;
mod federate;
mod hardening;
mod rebalance;
mod replay;
mod respond;
mod sql;
mod sql_security;
mod swap;
