"""Generate `prompts.jsonl`: labelled coding-task prompts for fitting and evaluating the learned
router classifier (`lagoon router fit examples/routing/prompts.jsonl`).

Labels come from a rule about the *work* a template describes, never from its wording (see
README.md): every template declares

- scope: `local` (the change and the evidence for it lie in one named place — a file, a function,
  a test, a config key) or `cross` (several modules, services or layers; or the place is unknown
  and must be found by reasoning about behaviour), and
- spec: `determined` (the result is fully specified: an exact rename, a failing test, a given
  value) or `open` (a choice among designs or trade-offs, or a diagnosis of an unknown cause).

RETRIEVAL_BOUND iff scope is local and spec is determined; otherwise REASONING_BOUND. Keywords
were placed on both sides on purpose ("fix" in cross-service bugs, "refactor"/"optimize"/"design"
in one-line edits), as real traffic does.

Run: `python examples/routing/make_prompts.py` (deterministic; seed 7).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

FILLS = {
    "file": ["src/api/handlers.py", "lib/parser.ts", "pkg/cache/lru.go", "app/models/user.rb", "src/main/java/com/acme/OrderService.java",
             "core/scheduler.py", "web/src/components/Table.tsx", "internal/auth/token.go", "billing/invoice.py", "cli/commands/deploy.py"],
    "func": ["parse_header", "load_config", "normalize_path", "compute_total", "retry_request", "render_table", "get_user",
             "validate_email", "flush_cache", "to_snake_case", "build_query", "resolve_alias"],
    "func2": ["parse_headers", "read_config", "clean_path", "total_amount", "send_with_retry", "draw_table", "fetch_user",
              "check_email", "clear_cache", "snake_case", "make_query", "lookup_alias"],
    "test": ["test_parse_empty_header", "test_total_with_discount", "test_user_not_found", "test_alias_cycle",
             "test_render_unicode", "test_config_defaults"],
    "exc": ["KeyError", "AssertionError", "TypeError", "IndexError", "AttributeError"],
    "msg": ["'content-type'", "expected 42, got 41", "unsupported operand type(s) for +: 'int' and 'str'",
            "list index out of range", "'NoneType' object has no attribute 'id'"],
    "config_key": ["max_connections", "request_timeout", "cache_ttl", "log_level", "retry_limit", "page_size"],
    "lib": ["requests", "pydantic", "sqlalchemy", "react-router", "express", "tokio"],
    "svc": ["ingest-worker", "billing-api", "notification-service", "search-indexer", "session-gateway"],
    "svc2": ["scheduler", "payments-adapter", "user-service", "audit-log", "rate-limiter"],
    "mod": ["accounts", "inventory", "reporting", "orders", "analytics"],
    "mod2": ["shared.accounts", "inventory_core", "reports.v2", "orders_domain", "metrics"],
    "endpoint": ["/api/search", "/api/orders", "/v2/reports/export", "/graphql", "/api/feed"],
    "thing": ["storage backends", "payment providers", "notification channels", "export formats", "auth methods"],
    "table": ["orders", "invoices", "sessions", "audit_events", "subscriptions"],
    "n1": ["30", "100", "3", "8080", "500"],
    "n2": ["60", "250", "5", "9090", "1000"],
    "ret": ["an empty list", "None", "0", "an empty dict"],
    "typo": ["recieved", "occured", "seperator", "adress"],
    "CONST": ["MAX_RETRIES", "DEFAULT_PORT", "PAGE_LIMIT", "TIMEOUT_S"],
    "type": ["dict[str, int]", "list[User]", "Optional[str]", "bool"],
    "v1": ["1.x", "2.3", "0.9"],
    "v2": ["2.x", "3.0", "1.0"],
    "url": ["https://docs.example.com/design", "docs/architecture.md"],
}

# (template id, scope, spec, text)
TEMPLATES = [
    ("typo_msg", "local", "determined", "Fix the typo in the error message raised by `{func}` in {file}: it says '{typo}'."),
    ("failing_test", "local", "determined", "The test `{test}` fails with `{exc}: {msg}`; make it pass by correcting `{func}` in {file}."),
    ("rename", "local", "determined", "Rename `{func}` to `{func2}` in {file} and update the callers in that file."),
    ("fstring", "local", "determined", "Refactor `{func}` in {file} to use f-strings instead of % formatting."),
    ("docstring", "local", "determined", "Add a docstring to `{func}` in {file} describing its parameters."),
    ("where_key", "local", "determined", "Where is `{config_key}` read? Point me to the file and line."),
    ("call_sites", "local", "determined", "List every call site of `{func}` in the repository."),
    ("unused_imports", "local", "determined", "Run the linter on {file} and remove the unused imports it reports."),
    ("default_value", "local", "determined", "Change the default of `{config_key}` from {n1} to {n2} in {file}."),
    ("bump", "local", "determined", "Bump `{lib}` from {v1} to {v2} in the requirements file; nothing else uses the changed API."),
    ("magic_number", "local", "determined", "Extract the magic number {n1} in `{func}` ({file}) into a module constant named `{CONST}`."),
    ("type_hint", "local", "determined", "Add a return type hint to `{func}` in {file}; it returns `{type}`."),
    ("black", "local", "determined", "Format {file} with black; the CI format check fails on it."),
    ("unit_test", "local", "determined", "Add a unit test for `{func}` covering the empty-input case; it should return {ret}."),
    ("broken_import", "local", "determined", "The import of `{func}` from `{mod}` in {file} broke after the module moved to `{mod2}`; update it."),
    ("show_none", "local", "determined", "Show me what `{func}` does when it gets None."),
    ("remove_alias", "local", "determined", "Remove the deprecated `{func2}` alias for `{func}` from {file}; nothing calls it."),
    ("copyright", "local", "determined", "Update the copyright year in the header of {file}."),
    ("raise_instead", "local", "determined", "Make `{func}` in {file} raise ValueError instead of returning -1 on negative input."),
    ("hardcoded_url", "local", "determined", "Replace the hard-coded URL in `{func}` with the `{config_key}` setting."),
    ("order_by", "local", "determined", "Find the SQL query that selects from `{table}` in {file} and add ORDER BY created_at."),
    ("isort", "local", "determined", "Optimize the import order in {file} so isort stops complaining."),
    ("readme_link", "local", "determined", "The design doc link in the README is broken; point it to {url}."),
    ("missing_await", "local", "determined", "Add the missing await before `{func}()` inside `{func2}` in {file}."),
    ("log_level", "local", "determined", "Lower the log level of the 'cache miss' message in `{func}` from info to debug."),
    ("deadlock", "cross", "open", "Fix the intermittent deadlock between {svc} and {svc2} under load; nobody knows which lock ordering causes it."),
    ("plugins", "cross", "open", "Let third parties add new {thing} without touching the `{mod}` package."),
    ("latency", "cross", "open", "p99 latency of {endpoint} doubled since the last release; find out why and bring it back down."),
    ("split_monolith", "cross", "open", "Split the `{mod}` package into separate packages for {thing} and reporting, keeping the public API stable."),
    ("retry_lib", "cross", "open", "Decide whether to replace our hand-written retry logic with a library, and migrate every service if so."),
    ("multitenant", "cross", "open", "Add multi-tenant support: every query in `{mod}`, `{mod2}` and the cache layer must be scoped by tenant."),
    ("flaky_ci", "cross", "open", "Tests pass locally but fail in CI about one run in five; figure out what is non-deterministic and fix it."),
    ("migrate_lib", "cross", "determined", "Migrate the whole codebase from `{lib}` {v1} to {v2}, whose async API changed."),
    ("event_sourcing", "cross", "open", "Introduce event sourcing for {table} so the billing and shipping services stay consistent."),
    ("leak", "cross", "open", "Memory in the {svc} worker grows until it is OOM-killed after a few hours; find the leak."),
    ("cache_strategy", "cross", "open", "Propose a caching strategy for {endpoint} that stays correct when {thing} change."),
    ("repro_build", "cross", "open", "Make our wheels reproducible across macOS and Linux; right now they differ in ways we don't understand."),
    ("planner", "cross", "open", "Rework the query planner in `{mod}` so joins over more than three tables stop exploding in cost."),
    ("auth_flow", "cross", "open", "Refactor authentication across the web app, the mobile API and the admin panel onto one token service."),
    ("occ", "cross", "determined", "Implement optimistic concurrency control for {table} updates in both the API and the background jobs."),
    ("stale_data", "cross", "open", "Why does `{func}` return stale data after a deploy even though the cache is flushed? Trace it through the services."),
    ("strict_types", "cross", "open", "Enabling strict type checking reports 300 errors across all packages; plan the cleanup and carry it out. Lint is clean."),
    ("shared_validation", "cross", "open", "Extract a shared validation library from the three services that each reimplement {thing} checks, and switch them over."),
    ("wire_precision", "cross", "open", "Converting between our v1 and v2 wire formats loses precision somewhere; find where and fix it end to end."),
    ("schema", "cross", "open", "Model the database schema for {thing} with audit history and soft deletes, and wire it into `{mod}`."),
    ("double_run", "cross", "open", "The scheduler sometimes runs the same job twice when two replicas start together; make job claiming safe."),
    ("tracing", "cross", "determined", "Add end-to-end tracing so a request can be followed from the gateway through {svc} and {svc2} to the database."),
    ("ws_vs_sse", "cross", "open", "Choose between websockets and server-sent events for live updates of {thing} and build the server side."),
    ("cold_start", "cross", "open", "Cut the CLI's cold start from 2 s to under 300 ms; profile it and change whatever is needed."),
    ("pagination", "cross", "open", "Pagination returns duplicates when rows are inserted during a scan; rework it in the API and the SDK."),
    ("py313", "cross", "determined", "Support Python 3.13 across the project: fix the C extension, the CI matrix and every deprecated API we call."),
    ("replay_harness", "cross", "open", "Write a test harness that replays production traffic against a staging build and diffs the responses."),
]

PREFIXES = ["", "", "", "Please ", "Can you ", "Quick one: ", "Task: "]
SUFFIXES = ["", "", "", " Keep the diff small.", " Add a test.", " Don't change the public API.", " Thanks!"]
PER_TEMPLATE = 8


def label(scope: str, spec: str) -> str:
    return "RETRIEVAL_BOUND" if scope == "local" and spec == "determined" else "REASONING_BOUND"


def context_size(rng: random.Random, scope: str) -> int:
    # Cross-cutting work tends to pull in more code, but the ranges overlap on purpose.
    median = 3500 if scope == "local" else 8000
    return int(math.exp(rng.gauss(math.log(median), 0.8)))


def generate(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for tid, scope, spec, text in TEMPLATES:
        for _ in range(PER_TEMPLATE):
            filled = text.format(**{k: rng.choice(v) for k, v in FILLS.items()})
            prefix = rng.choice(PREFIXES)
            body = filled[0].lower() + filled[1:] if prefix and not filled[0] == "`" else filled
            prompt = prefix + body + rng.choice(SUFFIXES)
            rows.append({"prompt": prompt, "context_size": context_size(rng, scope), "label": label(scope, spec),
                         "template": tid, "scope": scope, "spec": spec})
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    out = Path(__file__).with_name("prompts.jsonl")
    rows = generate()
    tmp = out.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(out)
    counts = {k: sum(r["label"] == k for r in rows) for k in ("RETRIEVAL_BOUND", "REASONING_BOUND")}
    print(f"wrote {len(rows)} rows to {out}: {counts}")
