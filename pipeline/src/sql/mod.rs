//! SQL over the twins: the view ([`view`]: Arrow tables of twins, recent verdicts,
//! alerts, commands and the `status` row, refreshed off the stream's thread), the
//! PostgreSQL-wire endpoint ([`server`]: logins, an allowlist of functions, bounded
//! plans), and the fleet reader ([`fleet`]: `twinguard sql`, every twin from the
//! changelog, no processing).
//!
//! Imports: `config`, `kafka`, `obs`, `engine` (the view is an engine observer;
//! the fleet reader restores through the engine's rules).

pub mod fleet;
pub mod server;
pub mod view;
