"""Checks the deployment files without a cluster (scripts/check-deploy installs the tools).

- helm/storyfarm: lints and renders with Helm's own engine (helm-python-sdk) for the default
  values and for ci/gpu-keda-monitoring-values.yaml; every rendered manifest validates with
  kubernetes-validate --strict; values.schema.json accepts both and rejects bad values.
- deploy/prometheus: promtool check config, check rules and test rules.
- deploy/grafana: every dashboard type-checks against @grafana/schema (tsc), and every PromQL
  expression in it parses (promtool) and names only metrics storyfarm exports (the list in
  crates/storyfarm-telemetry/src/metrics.rs).
- deploy/docker: hadolint; deploy/compose.yaml: docker-compose config.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import helm_python
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "storyfarm"
FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        FAILURES.append(what)


def run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    check(r.returncode == 0, f"{what}: {' '.join(map(str, cmd))}")
    if r.returncode != 0:
        print(r.stdout[-4000:], r.stderr[-4000:], sep="\n")
    return r.stdout


def chart() -> None:
    lint = helm_python.lint(str(CHART), strict=True)
    errors = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2] + lint.get("errors", [])
    check(not errors, f"helm lint --strict {CHART.relative_to(ROOT)} {errors or ''}")
    loaded = helm_python.Chart.load(str(CHART))
    cases = {"default values": None}
    for f in sorted((CHART / "ci").glob("*.yaml")):
        cases[f.name] = yaml.safe_load(f.read_text())
    with tempfile.TemporaryDirectory() as out:
        for name, values in cases.items():
            loaded.validate_schema(values or {})
            rendered = loaded.render(values, name="storyfarm", namespace="storyfarm", is_install=True)
            docs = []
            for template, text in sorted(rendered.items()):
                if template.endswith("NOTES.txt"):
                    check("storyfarm submit" in text, f"{name}: NOTES.txt says how to submit")
                    continue
                docs += [d for d in yaml.safe_load_all(text) if d]
            kinds = sorted({d["kind"] for d in docs})
            check(bool(docs), f"{name}: renders {len(docs)} objects ({', '.join(kinds)})")
            for i, doc in enumerate(docs):
                path = Path(out) / f"{name}-{i:02d}-{doc['kind']}.yaml"
                path.write_text(yaml.safe_dump(doc))
            files = sorted(str(p) for p in Path(out).glob(f"{name}-*.yaml"))
            # CRDs (KEDA, Prometheus Operator) have no bundled schema: kubernetes-validate says so
            # and skips them; everything else must validate strictly.
            run(["kubernetes-validate", "--strict", "--quiet", *files], f"{name}: manifests validate")
            if name != "default values":
                for kind in ("ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"):
                    check(kind in kinds, f"{name}: renders a {kind}")
                worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("worker"))
                limits = worker["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
                check(limits.get("nvidia.com/gpu") == 1, f"{name}: the worker requests a GPU")
                rule = next(d for d in docs if d["kind"] == "PrometheusRule")
                alerts = yaml.safe_load((CHART / "files" / "storyfarm-alerts.yaml").read_text())
                check(rule["spec"] == alerts, f"{name}: the PrometheusRule is deploy's tested rules file")
    bad_values = {
        "a worker device that does not exist": {"worker": {"device": "tpu"}},
        "a misspelt key": {"coordinator": {"replica": 2}},
        "a blob store that is not s3://": {"storage": {"blobs": "gs://bucket"}},
        "two coordinators (the loops take no lease yet)": {"coordinator": {"replicas": 2}},
        "a negative grace period": {"worker": {"terminationGracePeriodSeconds": -5}},
    }
    for why, values in bad_values.items():
        try:
            loaded.validate_schema(values)
            check(False, f"values.schema.json rejects {why}")
        except helm_python.HelmValuesError as e:
            check(True, f"values.schema.json rejects {why}: {str(e).splitlines()[0][:120]}")


def prometheus() -> None:
    d = ROOT / "deploy" / "prometheus"
    run(["promtool", "check", "config", "prometheus.yml"], "prometheus config", cwd=d)
    run(["promtool", "check", "rules", "alerts.yaml"], "alert rules", cwd=d)
    run(["promtool", "test", "rules", "alerts-test.yaml"], "alert rule unit tests", cwd=d)


def exported_metrics() -> set[str]:
    src = (ROOT / "crates" / "storyfarm-telemetry" / "src" / "metrics.rs").read_text()
    block = src[src.index("pub const METRIC_NAMES"):]
    block = block[: block.index("];")]
    names = set(re.findall(r'"(storyfarm_[a-z0-9_]+)"', block))
    series = set(names)
    for n in names:  # a histogram's series
        series |= {n + "_bucket", n + "_sum", n + "_count"}
    return series


PROMQL_KEYWORDS = {
    "sum", "max", "min", "avg", "count", "rate", "irate", "increase", "deriv", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "histogram_quantile",
    "clamp_min", "clamp_max", "abs", "absent", "vector", "label_values", "topk", "bottomk",
    "time", "offset", "bool", "le", "instance", "job", "stddev", "quantile", "scalar",
}


def dashboards(check_dir: Path) -> None:
    exported = exported_metrics()
    d = ROOT / "deploy" / "grafana" / "dashboards"
    boards = sorted(d.glob("*.json"))
    check(len(boards) >= 3, f"{len(boards)} dashboards")
    with tempfile.TemporaryDirectory(dir=check_dir) as tmp:
        exprs: list[tuple[str, str]] = []
        for b in boards:
            board = json.loads(b.read_text())
            # Grafana stores enums (threshold modes, sort orders) as their string values: the
            # schema's types with each string enum read as the union of its values.
            (Path(tmp) / f"{b.stem}.ts").write_text(
                "import type { Dashboard } from '@grafana/schema';\n"
                "type Stored<T> = T extends string ? `${T}` : T extends (infer U)[] ? Stored<U>[]\n"
                "  : T extends object ? { [K in keyof T]: Stored<T[K]> } : T;\n"
                f"export const d = {json.dumps(board, indent=1)} satisfies Stored<Dashboard>;\n"
            )

            def walk(node):
                if isinstance(node, dict):
                    if "expr" in node and isinstance(node["expr"], str):
                        exprs.append((b.name, node["expr"]))
                    for v in node.values():
                        walk(v)
                elif isinstance(node, list):
                    for v in node:
                        walk(v)

            walk(board.get("panels", []))
        (Path(tmp) / "tsconfig.json").write_text(json.dumps({
            "compilerOptions": {"strict": True, "noEmit": True, "module": "nodenext",
                                "moduleResolution": "nodenext", "target": "es2022", "skipLibCheck": True},
            "include": ["*.ts"],
        }))
        run([str(check_dir / "node_modules" / ".bin" / "tsc"), "-p", tmp], "dashboards type-check against @grafana/schema", cwd=check_dir)
        # PromQL: grafana's $__rate_interval becomes a plain range for the parser.
        rules = {"groups": [{"name": "dashboards", "rules": [
            {"record": f"dashboard:expr_{i}", "expr": e.replace("$__rate_interval", "5m").replace("$instance", ".*")}
            for i, (_, e) in enumerate(exprs)]}]}
        (Path(tmp) / "dashboard-exprs.yaml").write_text(yaml.safe_dump(rules))
        run(["promtool", "check", "rules", "dashboard-exprs.yaml"], f"{len(exprs)} dashboard PromQL expressions parse", cwd=tmp)
        unknown = set()
        for board, e in exprs:
            cleaned = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', " ", e)
            for ident in re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", cleaned):
                if ident in PROMQL_KEYWORDS or not ident.startswith("storyfarm_"):
                    continue
                if ident not in exported:
                    unknown.add(f"{board}: {ident}")
        check(not unknown, f"dashboards name only exported metrics {sorted(unknown) or ''}")
        used = {i for _, e in exprs for i in re.findall(r"storyfarm_[a-z0-9_]+", e)}
        check(len(used) >= 20, f"dashboards chart {len(used)} storyfarm series")


def containers() -> None:
    run(["hadolint", "--failure-threshold", "warning", "deploy/docker/Dockerfile"], "Dockerfile lint", cwd=ROOT)
    run(["docker-compose", "-f", "deploy/compose.yaml", "config", "-q"], "compose file", cwd=ROOT)


def main() -> int:
    check_dir = Path(sys.argv[1])
    chart()
    prometheus()
    dashboards(check_dir)
    containers()
    if FAILURES:
        print(f"\n{len(FAILURES)} deployment checks failed:", *FAILURES, sep="\n  ")
        return 1
    print("\nall deployment checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
