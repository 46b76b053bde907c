//! Tools around the pipeline, not part of it: the device simulator ([`sim`]), the
//! producer that loads records into a topic ([`produce`]) and the test broker
//! ([`testkit`]: a tansu process for integration tests and benches).
//!
//! Imports: `config` and `kafka` only.

pub mod produce;
pub mod sim;
pub mod testkit;
