"""Drives a real Consul client library (py-consul, `import consul`) against switchyard's
Consul-compatible API for the integration tests in tests/consul.rs.

    python3 consul_driver.py PORT OP [ARGS...]

Prints one JSON object on stdout. A client exception is an answer too:
{"error": "<exception class>", "message": "..."} (exit status 0), so the test can check it.

OPs:
  register JSON          agent.service.register(**JSON); "check": {"kind": "http"|"tcp"|"ttl", ...}
                         is built with consul.Check.http/tcp/ttl; "token" is passed as is
  deregister ID
  check_register JSON    agent.check.register(name, check, check_id=, service_id=)
  check_deregister CHECK_ID
  maintenance ID true|false [REASON]    agent.service.maintenance
  ttl pass|warn|fail CHECK_ID [NOTE]
  heartbeat CHECK_ID EVERY_S FOR_S [JSON]  ttl_pass every EVERY_S seconds for FOR_S seconds
                         (after registering JSON, as `register`, when given)
  health NAME [passing] [tag=T]         health.service -> {"index", "nodes"}
  block NAME INDEX WAIT [passing]       a blocking health.service; also "returned_at" (unix s)
  catalog_services | agent_services | agent_checks
"""

import json
import sys
import time

import consul


def build_check(spec):
    kind = spec.pop("kind")
    if kind == "http":
        return consul.Check.http(spec["url"], spec["interval"], timeout=spec.get("timeout"),
                                 deregister=spec.get("deregister"))
    if kind == "tcp":
        host, port = spec["addr"].rsplit(":", 1)
        return consul.Check.tcp(host, int(port), spec["interval"], timeout=spec.get("timeout"))
    if kind == "ttl":
        check = consul.Check.ttl(spec["ttl"])
        if spec.get("deregister"):
            check["DeregisterCriticalServiceAfter"] = spec["deregister"]
        return check
    raise SystemExit(f"unknown check kind {kind}")


def run(c, op, args):
    if op == "register":
        kwargs = json.loads(args[0])
        if "check" in kwargs:
            kwargs["check"] = build_check(kwargs["check"])
        return {"ok": c.agent.service.register(**kwargs)}
    if op == "check_register":
        spec = json.loads(args[0])
        check = build_check(spec.pop("check"))
        return {"ok": c.agent.check.register(spec["name"], check, check_id=spec.get("check_id"),
                                             service_id=spec.get("service_id"))}
    if op == "check_deregister":
        return {"ok": c.agent.check.deregister(args[0])}
    if op == "maintenance":
        reason = args[2] if len(args) > 2 else None
        return {"ok": c.agent.service.maintenance(args[0], args[1], reason)}
    if op == "deregister":
        return {"ok": c.agent.service.deregister(args[0])}
    if op == "ttl":
        verb, check_id = args[0], args[1]
        note = args[2] if len(args) > 2 else None
        fn = {"pass": c.agent.check.ttl_pass, "warn": c.agent.check.ttl_warn,
              "fail": c.agent.check.ttl_fail}[verb]
        return {"ok": fn(check_id, note)}
    if op == "heartbeat":
        check_id, every, total = args[0], float(args[1]), float(args[2])
        if len(args) > 3:
            # register first, in this process: the first heartbeat follows at once, as in a
            # service (a second python process can take longer to start than a short TTL)
            registered = run(c, "register", args[3:4])
            if not registered["ok"]:
                return registered
        end = time.time() + total
        beats, last_beat = 0, None
        while time.time() < end:
            if not c.agent.check.ttl_pass(check_id, "alive"):
                return {"ok": False, "beats": beats}
            beats += 1
            last_beat = time.time()
            time.sleep(every)
        return {"ok": True, "beats": beats, "last_beat": last_beat}
    if op == "health":
        passing = "passing" in args
        tag = next((a[4:] for a in args if a.startswith("tag=")), None)
        index, nodes = c.health.service(args[0], passing=passing, tag=tag)
        return {"index": int(index), "nodes": nodes}
    if op == "block":
        name, index, wait = args[0], args[1], args[2]
        passing = "passing" in args[3:]
        started = time.time()
        new_index, nodes = c.health.service(name, index=index, wait=wait, passing=passing)
        now = time.time()
        return {"index": int(new_index), "nodes": nodes, "returned_at": now,
                "elapsed": now - started}
    if op == "catalog_services":
        index, services = c.catalog.services()
        return {"index": int(index), "services": services}
    if op == "agent_services":
        return {"services": c.agent.services()}
    if op == "agent_checks":
        return {"checks": c.agent.checks()}
    raise SystemExit(f"unknown op {op}")


def main():
    port, op, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    token = None
    if args and args[0].startswith("--token="):
        token, args = args[0][len("--token="):], args[1:]
    c = consul.Consul(host="127.0.0.1", port=port, token=token)
    try:
        out = run(c, op, args)
    except consul.ConsulException as e:
        out = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
