//! Who may log in: SCRAM users with a mock salt for unknown names (`Users`), and the
//! per-address back-off after failed logins (`LoginThrottle`).

use super::*;

/// The configured users as SCRAM verifiers (salted once at start; the passwords
/// themselves are not kept).
#[derive(Debug)]
pub(super) struct Users {
    pub(super) known: HashMap<String, (Vec<u8>, Vec<u8>)>,
    /// Keys the mock salts and verifiers of names that are not users.
    pub(super) secret: [u8; 32],
}

impl Users {
    pub(super) fn new(users: &[(String, String)]) -> Self {
        let verifier = |p: &str| {
            let salt: [u8; 16] = rand::random();
            (salt.to_vec(), gen_salted_password(p, &salt, SCRAM_ITERATIONS))
        };
        Users { known: users.iter().map(|(u, p)| (u.clone(), verifier(p))).collect(), secret: rand::random() }
    }

    /// A name that is not a user: a salt (as long as a real one) and a verifier no
    /// password matches, both derived from the name, as PostgreSQL's
    /// `scram_mock_salt` does. The same name gets the same salt at every attempt,
    /// and two names get different ones, exactly as for real users; the login fails
    /// at the same step as a wrong password, after the same work.
    pub(super) fn mock(&self, user: &str) -> (Vec<u8>, Vec<u8>) {
        let salt = hmac_sha256(&self.secret, format!("twinguard-scram-mock-salt\0{user}").as_bytes());
        let verifier = hmac_sha256(&self.secret, format!("twinguard-scram-mock-verifier\0{user}").as_bytes());
        (salt[..16].to_vec(), verifier.to_vec())
    }

    pub(super) fn verifier(&self, user: &str) -> (Vec<u8>, Vec<u8>) {
        self.known.get(user).cloned().unwrap_or_else(|| self.mock(user))
    }
}

#[async_trait]
impl AuthSource for Users {
    async fn get_password(&self, login: &LoginInfo) -> PgWireResult<Password> {
        let (salt, salted) = self.verifier(login.user().unwrap_or_default());
        Ok(Password::new(Some(salt), salted))
    }
}

/// Refused connections (past `sql.max_connections`) told why at once; more are
/// closed on accept.
pub const REFUSALS_AT_ONCE: usize = 16;

/// Failed logins allowed from one address before the back-off starts.
pub const FREE_FAILURES: u32 = 5;

/// The first back-off; each further failure doubles it, up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);

pub const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// An address with no failure for this long starts over.
pub(super) const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

/// Addresses tracked at most (stale ones are dropped first; past this, the oldest).
pub(super) const MAX_TRACKED: usize = 100_000;

/// Failed logins per peer address, and the back-off they earn: after
/// [`FREE_FAILURES`] failures, each failure refuses every login from that address
/// for `BACKOFF_BASE · 2^(failures − FREE_FAILURES − 1)`, capped at [`BACKOFF_CAP`].
/// Refused attempts do not count as failures (their password is never checked).
/// IPv6 addresses count per /64 (one host usually holds a whole /64).
#[derive(Debug, Default)]
pub struct LoginThrottle {
    pub(super) peers: Mutex<HashMap<IpAddr, Peer>>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub(super) failures: u32,
    pub(super) last: std::time::Instant,
    pub(super) until: Option<std::time::Instant>,
}

impl LoginThrottle {
    pub(super) fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            },
            v4 => v4,
        }
    }

    /// `Err(wait)` while logins from `ip` are backed off.
    pub fn check(&self, ip: IpAddr, now: std::time::Instant) -> Result<(), Duration> {
        let mut peers = self.peers.lock().expect("throttle lock");
        let key = Self::key(ip);
        match peers.get(&key).copied() {
            Some(p) if now.saturating_duration_since(p.last) > FORGET_AFTER => {
                peers.remove(&key);
                Ok(())
            }
            Some(Peer { until: Some(until), .. }) if until > now => Err(until - now),
            _ => Ok(()),
        }
    }

    /// Count a failed login from `ip`: (failures so far, the back-off it starts).
    pub fn failed(&self, ip: IpAddr, now: std::time::Instant) -> (u32, Option<Duration>) {
        let mut peers = self.peers.lock().expect("throttle lock");
        if peers.len() >= MAX_TRACKED {
            peers.retain(|_, p| now.saturating_duration_since(p.last) <= FORGET_AFTER);
            if peers.len() >= MAX_TRACKED {
                if let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.last).map(|(k, _)| *k) {
                    peers.remove(&oldest);
                }
            }
        }
        let p = peers.entry(Self::key(ip)).or_insert(Peer { failures: 0, last: now, until: None });
        if now.saturating_duration_since(p.last) > FORGET_AFTER {
            p.failures = 0;
        }
        p.failures = p.failures.saturating_add(1);
        p.last = now;
        let backoff = (p.failures > FREE_FAILURES).then(|| {
            let doublings = (p.failures - FREE_FAILURES - 1).min(16);
            (BACKOFF_BASE * (1u32 << doublings)).min(BACKOFF_CAP)
        });
        p.until = backoff.map(|b| now + b);
        (p.failures, backoff)
    }
}
