//! One etcd endpoint at a time, the next after a failure: how every etcd client of switchyard
//! connects (the registry, the registrar of `switchyard register`, the Consul API's store).
//!
//! A client balancing over all endpoints keeps sending requests to a member that hangs with its
//! connections open (a stopped process or VM): the kernel still accepts on its port and HTTP/2
//! does not wait for the server's SETTINGS, so after the keep-alive fails one connection the next
//! one counts as ready and gets a random share of the requests, each lost until a timeout. A
//! client of one endpoint, dropped for a fresh client of the next after any failure, loses one
//! request or one keep-alive timeout to a hung member, then asks another.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};
use rand::Rng;

/// How a client is made; each user keeps its own keep-alive.
#[derive(Debug, Clone)]
pub(crate) struct Dial {
    /// Deadline of the connect (and of the authentication, with credentials).
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive: a PING after this long without a frame ...
    pub keep_alive_interval: Duration,
    /// ... and this long for its answer before the connection counts as dead.
    pub keep_alive_timeout: Duration,
    /// etcd user and password.
    pub credentials: Option<(String, String)>,
}

/// Why no client could be made for the current endpoint.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to etcd at {endpoint} timed out after {after:?}")]
    Timeout { endpoint: String, after: Duration },
    #[error("connect to etcd at {endpoint} failed: {source}")]
    Failed {
        endpoint: String,
        #[source]
        source: etcd_client::Error,
    },
}

impl ConnectError {
    /// The endpoint cannot be used at all (a malformed URL), as opposed to not answering.
    pub(crate) fn is_bad_endpoint(&self) -> bool {
        matches!(
            self,
            ConnectError::Failed {
                source: etcd_client::Error::InvalidUri(_)
                    | etcd_client::Error::InvalidArgs(_)
                    | etcd_client::Error::EndpointError(_),
                ..
            }
        )
    }
}

/// The endpoints, the one in use and its client (made on first use).
pub(crate) struct Endpoints {
    list: Vec<String>,
    dial: Dial,
    /// Index of the endpoint in use: random at first (many clients spread over the members).
    current: usize,
    client: Option<Client>,
    /// Counts the failures: a caller sharing this between tasks says which client failed.
    generation: u64,
}

impl Endpoints {
    pub(crate) fn new(list: Vec<String>, dial: Dial) -> Endpoints {
        let current = rand::thread_rng().gen_range(0..list.len().max(1));
        Endpoints {
            list,
            dial,
            current,
            client: None,
            generation: 0,
        }
    }

    /// The endpoint in use ("" when there is none).
    pub(crate) fn current(&self) -> &str {
        self.list.get(self.current).map_or("", String::as_str)
    }

    /// Increases with every [`Endpoints::failed`].
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The client of the current endpoint alone, made now if there is none.
    pub(crate) async fn client(&mut self) -> Result<Client, ConnectError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let d = &self.dial;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(d.connect_timeout)
            .with_keep_alive(d.keep_alive_interval, d.keep_alive_timeout)
            .with_keep_alive_while_idle(true)
            // a member cut off from its leader fails requests at once instead of hanging them
            .with_require_leader(true);
        if let Some((u, p)) = &d.credentials {
            opts = opts.with_user(u.clone(), p.clone());
        }
        let endpoint = self.current().to_string();
        let connect = Client::connect([endpoint.as_str()], Some(opts));
        let client = tokio::time::timeout(d.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout {
                endpoint: endpoint.clone(),
                after: d.connect_timeout,
            })?
            .map_err(|source| ConnectError::Failed { endpoint, source })?;
        self.client = Some(client.clone());
        Ok(client)
    }

    /// The client failed: drop it, and the next call of [`Endpoints::client`] connects to the
    /// next endpoint.
    pub(crate) fn failed(&mut self) {
        self.client = None;
        self.current = (self.current + 1) % self.list.len().max(1);
        self.generation += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dial() -> Dial {
        Dial {
            connect_timeout: Duration::from_secs(1),
            keep_alive_interval: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(3),
            credentials: None,
        }
    }

    #[test]
    fn every_failure_moves_to_the_next_endpoint_in_turn() {
        let list: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut e = Endpoints::new(list.clone(), dial());
        let first = list
            .iter()
            .position(|x| x == e.current())
            .expect("one of them");
        for step in 1..=6 {
            e.failed();
            assert_eq!(
                e.current(),
                list[(first + step) % 3],
                "after {step} failures"
            );
            assert_eq!(e.generation(), step as u64);
        }
        assert_eq!(Endpoints::new(Vec::new(), dial()).current(), "");
    }

    #[tokio::test]
    async fn a_malformed_endpoint_is_told_apart() {
        let mut e = Endpoints::new(vec!["http://[::1".into()], dial());
        match e.client().await {
            Err(err) => assert!(err.is_bad_endpoint(), "{err}"),
            Ok(_) => panic!("a client of a malformed URL"),
        }
    }
}
