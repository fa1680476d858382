//! Route matching: request (host, path) → service name and upstream path.
//!
//! Order (first match wins):
//! 1. explicit routes from config, most specific first: routes with a host before routes without,
//!    then longer path prefixes first, then config order;
//! 2. `Host: <service>` or `Host: <service>.<suffix>` for each configured suffix;
//! 3. path `/<service>/rest`, forwarded as `/rest`.
//!
//! A path prefix matches whole segments: `/api` matches `/api`, `/api/x` and `/api?q`, not `/apix`.

use std::sync::Arc;

use super::RoutingTable;

/// An explicit route from config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplicitRoute {
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<String>,
    /// Path prefix starting with `/`; `None` matches any path.
    pub path_prefix: Option<String>,
    pub service: Arc<str>,
    /// Remove `path_prefix` from the upstream path.
    pub strip_prefix: bool,
}

/// Which rule matched a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMatch {
    /// An explicit route: the service is configured, so a missing one is "unavailable" (503).
    Explicit { service: Arc<str>, strip: usize },
    /// Implicit host or path routing to a service the table knows.
    Implicit { service: Arc<str>, strip: usize },
    /// No rule matched; `name` is what the request seemed to ask for, for the 404 body.
    Unknown { name: String },
}

/// Route matcher built once from config.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<ExplicitRoute>,
    host_suffixes: Vec<String>,
    host_routing: bool,
    path_routing: bool,
}

fn prefix_matches(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || rest.starts_with('?'),
        None => false,
    }
}

/// Host header without port, as written (callers lower-case if needed).
pub fn host_without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

impl Router {
    pub fn new(
        mut routes: Vec<ExplicitRoute>,
        host_suffixes: Vec<String>,
        host_routing: bool,
        path_routing: bool,
    ) -> Self {
        // stable sort keeps config order among equally specific routes
        routes.sort_by_key(|r| {
            (
                r.host.is_none(),
                std::cmp::Reverse(r.path_prefix.as_ref().map_or(0, |p| p.len())),
            )
        });
        let host_suffixes = host_suffixes
            .into_iter()
            .map(|s| s.trim_start_matches('.').to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect();
        Router {
            routes,
            host_suffixes,
            host_routing,
            path_routing,
        }
    }

    /// Services named by explicit routes (known even before any instance registers).
    pub fn explicit_services(&self) -> impl Iterator<Item = &Arc<str>> {
        self.routes.iter().map(|r| &r.service)
    }

    /// Matches a request. `host` is the Host header (or URI authority), `path` the path and query.
    pub fn route(&self, table: &RoutingTable, host: Option<&str>, path: &str) -> RouteMatch {
        let host = host.map(host_without_port);
        // Lower-case only when needed: most Host headers already are, and this is the hot path.
        let host_lc: Option<std::borrow::Cow<'_, str>> = host.map(|h| {
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                std::borrow::Cow::Owned(h.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(h)
            }
        });
        for r in &self.routes {
            if let Some(want) = &r.host {
                if host_lc.as_deref() != Some(want.as_str()) {
                    continue;
                }
            }
            let strip = match &r.path_prefix {
                Some(p) if !prefix_matches(path, p) => continue,
                Some(p) if r.strip_prefix => p.trim_end_matches('/').len(),
                _ => 0,
            };
            return RouteMatch::Explicit {
                service: r.service.clone(),
                strip,
            };
        }
        if self.host_routing {
            if let (Some(host), Some(lc)) = (host, host_lc.as_deref()) {
                let lc_differs = lc != host;
                for candidate in [Some(host), lc_differs.then_some(lc)].into_iter().flatten() {
                    if let Some((name, _)) = table.services.get_key_value(candidate) {
                        return RouteMatch::Implicit {
                            service: name.clone(),
                            strip: 0,
                        };
                    }
                }
                for suffix in &self.host_suffixes {
                    let Some(name) = lc
                        .strip_suffix(suffix.as_str())
                        .and_then(|n| n.strip_suffix('.'))
                    else {
                        continue;
                    };
                    let original = &host[..name.len()];
                    for candidate in [original, name] {
                        if let Some((name, _)) = table.services.get_key_value(candidate) {
                            return RouteMatch::Implicit {
                                service: name.clone(),
                                strip: 0,
                            };
                        }
                    }
                }
            }
        }
        let first_segment = path
            .strip_prefix('/')
            .map(|p| p.split(['/', '?']).next().unwrap_or(""))
            .unwrap_or("");
        if self.path_routing && !first_segment.is_empty() {
            if let Some((name, _)) = table.services.get_key_value(first_segment) {
                return RouteMatch::Implicit {
                    service: name.clone(),
                    strip: 1 + first_segment.len(),
                };
            }
        }
        let name = if !first_segment.is_empty() && self.path_routing {
            first_segment.to_string()
        } else {
            host.unwrap_or("").to_string()
        };
        RouteMatch::Unknown { name }
    }
}

/// Removes the first `strip` bytes of `path` (a matched prefix) and keeps it a valid origin-form
/// path: `/svc/a?q` with strip 4 → `/a?q`; `/svc` → `/`; `/svc?q` → `/?q`.
pub fn strip_path(path: &str, strip: usize) -> String {
    let rest = path.get(strip..).unwrap_or("");
    if rest.starts_with('/') {
        rest.to_string()
    } else {
        format!("/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::{Service, ServiceMap, ServiceSettings};

    fn table(names: &[&str]) -> RoutingTable {
        let services: ServiceMap = names
            .iter()
            .map(|n| {
                let name: Arc<str> = (*n).into();
                (
                    name.clone(),
                    Arc::new(Service::new(name, vec![], 0, &ServiceSettings::default())),
                )
            })
            .collect();
        RoutingTable {
            services,
            revision: 1,
        }
    }

    fn implicit(s: &str, strip: usize) -> RouteMatch {
        RouteMatch::Implicit {
            service: s.into(),
            strip,
        }
    }

    #[test]
    fn host_then_suffix_then_path() {
        let t = table(&["users", "orders"]);
        let r = Router::new(vec![], vec!["svc.local".into()], true, true);
        assert_eq!(r.route(&t, Some("users"), "/x"), implicit("users", 0));
        assert_eq!(r.route(&t, Some("users:8080"), "/x"), implicit("users", 0));
        assert_eq!(
            r.route(&t, Some("Users.SVC.local"), "/x"),
            implicit("users", 0)
        );
        assert_eq!(
            r.route(&t, Some("localhost:8080"), "/orders/1?a=b"),
            implicit("orders", 7)
        );
        assert_eq!(
            r.route(&t, Some("localhost"), "/orders"),
            implicit("orders", 7)
        );
        assert_eq!(
            r.route(&t, Some("localhost"), "/nope/1"),
            RouteMatch::Unknown {
                name: "nope".into()
            }
        );
        assert_eq!(
            r.route(&t, Some("localhost"), "/"),
            RouteMatch::Unknown {
                name: "localhost".into()
            }
        );
    }

    #[test]
    fn explicit_routes_come_first_most_specific_first() {
        let t = table(&["users", "api"]);
        let routes = vec![
            ExplicitRoute {
                host: None,
                path_prefix: Some("/api".into()),
                service: "api".into(),
                strip_prefix: true,
            },
            ExplicitRoute {
                host: None,
                path_prefix: Some("/api/v2".into()),
                service: "v2".into(),
                strip_prefix: false,
            },
            ExplicitRoute {
                host: Some("users".into()),
                path_prefix: None,
                service: "custom".into(),
                strip_prefix: false,
            },
        ];
        let r = Router::new(routes, vec![], true, true);
        let explicit = |s: &str, strip| RouteMatch::Explicit {
            service: s.into(),
            strip,
        };
        assert_eq!(r.route(&t, Some("users"), "/api/x"), explicit("custom", 0));
        assert_eq!(r.route(&t, Some("h"), "/api/v2/x"), explicit("v2", 0));
        assert_eq!(r.route(&t, Some("h"), "/api/x"), explicit("api", 4));
        assert_eq!(r.route(&t, Some("h"), "/api?x=1"), explicit("api", 4));
        // segment-aware: /apix is not under /api
        assert_eq!(
            r.route(&t, Some("h"), "/apix"),
            RouteMatch::Unknown {
                name: "apix".into()
            }
        );
    }

    #[test]
    fn disabled_implicit_routing_is_not_used() {
        let t = table(&["users"]);
        let r = Router::new(vec![], vec![], false, false);
        assert!(matches!(
            r.route(&t, Some("users"), "/users/x"),
            RouteMatch::Unknown { .. }
        ));
    }

    #[test]
    fn strip_path_keeps_origin_form() {
        assert_eq!(strip_path("/svc/a?q=1", 4), "/a?q=1");
        assert_eq!(strip_path("/svc", 4), "/");
        assert_eq!(strip_path("/svc?q", 4), "/?q");
        assert_eq!(strip_path("/x", 0), "/x");
        assert_eq!(strip_path("/x", 99), "/");
    }

    #[test]
    fn host_port_is_removed() {
        assert_eq!(host_without_port("a:80"), "a");
        assert_eq!(host_without_port("a"), "a");
        assert_eq!(host_without_port("[::1]:80"), "::1");
    }
}
