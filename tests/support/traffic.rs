//! [`Traffic`]: requests sent one after another through the proxy while a test breaks etcd.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{eventually, Proxy};

/// How long [`Traffic::wait_more`] waits for the requests it asks for.
const PATIENCE: Duration = Duration::from_secs(15);

/// Requests sent one after another through the proxy to one service until stopped; every answer
/// that is not a 200 (or no answer) is kept.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    pub fn start(proxy: &Proxy, service: &str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (url, service) = (proxy.url("/"), service.to_string());
        let task = tokio::spawn({
            let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
            async move {
                let http = super::client();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let failure = match http.get(&url).header("host", &service).send().await {
                        Ok(r) if r.status() == 200 => None,
                        Ok(r) => Some(format!(
                            "{} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        )),
                        Err(e) => Some(format!("no answer: {e}")),
                    };
                    if let Some(f) = failure {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("after {:?}: {f}", sent.elapsed()));
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Traffic {
            stop,
            answered,
            failures,
            task,
        }
    }

    /// Waits until `n` more requests have been answered: the traffic goes on.
    pub async fn wait_more(&self, n: u64) {
        let want = self.answered.load(Ordering::Relaxed) + n;
        eventually(PATIENCE, &format!("{n} more requests answered"), || async {
            let got = self.answered.load(Ordering::Relaxed);
            (got >= want)
                .then_some(())
                .ok_or(format!("{got} of {want}"))
        })
        .await;
    }

    /// Stops, and asserts that every request was answered with a 200; returns how many.
    pub async fn assert_all_succeeded(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the traffic task");
        let failures = self.failures.lock().unwrap();
        let answered = self.answered.load(Ordering::Relaxed);
        assert!(
            failures.is_empty(),
            "{} of {answered} requests through the proxy failed, the first: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        answered
    }
}
