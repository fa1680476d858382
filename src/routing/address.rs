//! Where an instance can be reached, as it was registered.

use std::fmt;

/// An instance's address as the registry wrote it (not yet resolved): the registry's codecs
/// produce it, an [`Instance`](super::Instance) keeps it for display and for the Host of its
/// health checks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    /// IP literal (without brackets) or DNS name.
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}
