//! The registrar loop: keeps `reg.key` in etcd, under a live lease, exactly while the gate is open.
//!
//! - gate open, nothing written: grant a lease, put the key under it, keep the lease alive;
//! - keep-alive answers TTL 0 (lease gone: etcd wiped and restarted, partition longer than the
//!   TTL): grant and put again at once;
//! - keep-alive error or timeout (etcd down, stream dead, a member hung): grant and put again
//!   with capped, jittered backoff, through the next endpoint; the key moves to the new lease and
//!   the old lease is revoked;
//! - gate closed (check failing): delete the key, revoke the lease;
//! - stop (signal, wrapped command exited): delete the key, revoke the lease, return.
//!
//! Every etcd call has a deadline, so a dead connection never hangs the loop. The registrar talks
//! to one endpoint at a time and to the next, with a fresh client, after every failure
//! ([`crate::registry::endpoints`] says why).

use std::time::Duration;

use etcd_client::PutOptions;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{timed, wait_for_value, Registration};
use crate::registry::endpoints::Endpoints;
use crate::registry::Backoff;

/// First retry delay after an etcd failure.
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest retry delay: a registrar is one client, so retrying every second costs nothing and
/// gets the key back soon after etcd returns.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Deadline of one etcd request: shorter than the TTL where possible, so a hung request is
/// noticed before the lease would expire, within 1-5 s.
fn request_timeout(ttl: i64) -> Duration {
    Duration::from_secs(ttl.clamp(1, 5) as u64)
}

/// Keep-alive period: a third of the TTL, so two lost answers still leave the lease alive.
fn keep_alive_period(ttl: i64) -> Duration {
    Duration::from_millis((ttl.max(1) as u64 * 1000 / 3).max(200))
}

/// Why keep-alive stopped.
#[derive(Debug)]
enum KeepAliveEnd {
    /// The lease is gone (answer with TTL 0).
    Lost,
    /// etcd error or deadline.
    Failed(String),
}

/// Grants a lease and writes the key under it; returns the lease id and the granted TTL.
/// `put_sent` turns true once the put is on its way (it may apply even if we see an error).
async fn grant_and_put(
    etcd: &mut Endpoints,
    reg: &Registration,
    put_sent: &mut bool,
) -> Result<(i64, i64), String> {
    let limit = request_timeout(reg.ttl);
    let mut client = etcd.client().await.map_err(|e| e.to_string())?;
    let lease = timed("lease grant", limit, client.lease_grant(reg.ttl, None)).await?;
    let (id, granted) = (lease.id(), lease.ttl());
    *put_sent = true;
    timed(
        "put",
        limit,
        client.put(
            reg.key.as_bytes(),
            reg.value.as_bytes(),
            Some(PutOptions::new().with_lease(id)),
        ),
    )
    .await?;
    Ok((id, granted))
}

/// Keeps lease `id` alive until it is lost or etcd fails; runs until cancelled otherwise.
async fn keep_alive(etcd: &mut Endpoints, id: i64, ttl: i64) -> KeepAliveEnd {
    let limit = request_timeout(ttl);
    let mut client = match etcd.client().await {
        Ok(c) => c,
        Err(e) => return KeepAliveEnd::Failed(e.to_string()),
    };
    let (mut keeper, mut stream) =
        match timed("keep-alive", limit, client.lease_keep_alive(id)).await {
            Ok(s) => s,
            Err(e) => return KeepAliveEnd::Failed(e),
        };
    let period = keep_alive_period(ttl);
    loop {
        if let Err(e) = timed("keep-alive send", limit, keeper.keep_alive()).await {
            return KeepAliveEnd::Failed(e);
        }
        match timed("keep-alive answer", limit, stream.message()).await {
            Err(e) => return KeepAliveEnd::Failed(e),
            Ok(None) => return KeepAliveEnd::Failed("keep-alive stream ended".into()),
            Ok(Some(r)) if r.ttl() <= 0 => return KeepAliveEnd::Lost,
            Ok(Some(_)) => {}
        }
        tokio::time::sleep(period).await;
    }
}

/// Deletes the key first (the proxy stops routing at once), then frees the lease (through the
/// next endpoint when the delete failed: revoking the lease deletes the key too).
async fn deregister(etcd: &mut Endpoints, reg: &Registration, lease: Option<i64>) -> bool {
    let limit = request_timeout(reg.ttl);
    let deleted = match etcd.client().await {
        Ok(mut c) => timed("delete", limit, c.delete(reg.key.as_bytes(), None)).await,
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = &deleted {
        warn!(key = %reg.key, endpoint = etcd.current(), error = %e,
            "could not delete the key; it expires with its lease");
        etcd.failed();
    }
    if let Some(id) = lease {
        let revoked = match etcd.client().await {
            Ok(mut c) => timed("lease revoke", limit, c.lease_revoke(id)).await,
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = revoked {
            warn!(lease = id, endpoint = etcd.current(), error = %e,
                "could not revoke the lease; it expires by itself");
            etcd.failed();
        }
    }
    deleted.is_ok()
}

/// Runs until `stop` turns true, then deregisters. etcd being unreachable is retried forever;
/// a dead connection is noticed by the request deadlines and the client's HTTP/2 keep-alive,
/// and every failure moves to the next endpoint.
pub async fn run(
    reg: Registration,
    mut etcd: Endpoints,
    mut gate: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
    // lease the key is currently written under
    let mut lease: Option<i64> = None;
    // a put may have reached etcd and the key was not deleted since
    let mut written = false;
    // etcd trouble is logged once per outage, not once per retry
    let mut failing = false;
    loop {
        if *stop.borrow() {
            break;
        }
        if !*gate.borrow_and_update() {
            if written {
                if deregister(&mut etcd, &reg, lease.take()).await {
                    info!(key = %reg.key, "deregistered while the check fails");
                }
                written = false;
            }
            tokio::select! {
                _ = wait_for_value(&mut stop, true) => break,
                _ = wait_for_value(&mut gate, true) => continue,
            }
        }

        let mut put_sent = false;
        let granted = tokio::select! {
            _ = wait_for_value(&mut stop, true) => None,
            r = grant_and_put(&mut etcd, &reg, &mut put_sent) => Some(r),
        };
        written |= put_sent;
        let Some(granted) = granted else { break };
        let id = match granted {
            Ok((id, granted_ttl)) => {
                if failing {
                    info!(key = %reg.key, "etcd reachable again");
                }
                info!(key = %reg.key, value = %reg.value, lease = id, ttl = granted_ttl,
                    endpoint = etcd.current(), "registered");
                if granted_ttl != reg.ttl {
                    warn!(
                        asked = reg.ttl,
                        granted = granted_ttl,
                        "etcd granted a different lease ttl"
                    );
                }
                if let Some(old) = lease.replace(id) {
                    // the key now lives under the new lease; the old one (if etcd kept it) is
                    // only a leftover
                    if let Ok(mut c) = etcd.client().await {
                        let revoke = c.lease_revoke(old);
                        if let Err(e) =
                            timed("lease revoke", request_timeout(reg.ttl), revoke).await
                        {
                            debug!(lease = old, error = %e, "old lease not revoked; it expires");
                        }
                    }
                }
                backoff.reset();
                failing = false;
                id
            }
            Err(e) => {
                if !failing {
                    warn!(key = %reg.key, endpoint = etcd.current(), error = %e,
                        "etcd unavailable; retrying with backoff through the next endpoint");
                    failing = true;
                }
                etcd.failed();
                tokio::select! {
                    _ = wait_for_value(&mut stop, true) => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => continue,
                }
            }
        };

        let end = tokio::select! {
            _ = wait_for_value(&mut stop, true) => break,
            _ = wait_for_value(&mut gate, false) => continue,
            end = keep_alive(&mut etcd, id, reg.ttl) => end,
        };
        match end {
            KeepAliveEnd::Lost => {
                warn!(key = %reg.key, lease = id, "lease lost; registering again");
                lease = None;
            }
            KeepAliveEnd::Failed(e) => {
                warn!(key = %reg.key, lease = id, endpoint = etcd.current(), error = %e,
                    "keep-alive failed; registering again through the next endpoint");
                failing = true;
                etcd.failed();
                tokio::select! {
                    _ = wait_for_value(&mut stop, true) => break,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
    if written && deregister(&mut etcd, &reg, lease).await {
        info!(key = %reg.key, "deregistered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_follow_the_ttl() {
        assert_eq!(request_timeout(1), Duration::from_secs(1));
        assert_eq!(request_timeout(2), Duration::from_secs(2));
        assert_eq!(request_timeout(600), Duration::from_secs(5));
        assert_eq!(keep_alive_period(1), Duration::from_millis(333));
        assert_eq!(keep_alive_period(10), Duration::from_millis(3333));
    }
}
