#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/ without a cluster.

    .tools/venv/bin/python scripts/check-manifests.py [--envoy-out DIR] [PATH ...]

PATH: manifest files or directories (default: deploy/). A directory with a
kustomization.yaml is built with `kubectl kustomize` and what it builds is checked (what
`kubectl apply -k` would send; its *.example.yaml files too, which it leaves out); a
directory with a Chart.yaml is linted and rendered with `helm template`, with its
default values and with each of its ci/*-values.yaml.

Every document must be a kind this script knows:
  - the custom resources (EnvoyFilter, WasmPlugin, EnvoyExtensionPolicy, EnvoyPatchPolicy,
    Gateway, HTTPRoute) against deploy/schemas/*.json, strictly: a field the schema does
    not declare is an error, as `kubectl apply` makes it one;
  - the built-in kinds against the Kubernetes API schemas of kubernetes-validate, strictly.
One line per document (OK / FAIL with the first error and its path); exit status 1 if any
fails.

--envoy-out DIR also writes what Envoy and the filter must accept, for the tests to load
(tests/e2e/deploy.rs):
  DIR/envoy/<name>.yaml      a bootstrap per manifest that configures Envoy: an EnvoyFilter's
                             patches assembled as Istio applies them (the ECDS
                             configuration inline, with the module as a local file, as the
                             istio-agent hands it to Envoy); an EnvoyExtensionPolicy's filter
                             as Envoy Gateway generates it, with the EnvoyPatchPolicy's JSON
                             patches applied; an Envoy bootstrap held in a ConfigMap or Secret
  DIR/plugin/<name>.json     every knocker plugin configuration found
The module's path is written as @WASM@.
"""
import argparse
import base64
import copy
import json
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate.utils as kv
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, ".tools", "bin")
WASM = "@WASM@"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager")
ROUTER = {"name": "envoy.filters.http.router", "typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


class Loader(yaml.SafeLoader):
    """YAML as the API server reads it: duplicate keys are errors, timestamps strings."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


Loader.yaml_implicit_resolvers = {
    k: [r for r in v if r[0] != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}


def strict(node):
    """additionalProperties: false on every declared object that is not free-form."""
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    is_object = kind == "object" or isinstance(kind, list) and "object" in kind
    if is_object and "properties" in node and "additionalProperties" not in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        node["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for sub in (node.get(key) or {}).values():
            strict(sub)
    for key in ("additionalProperties", "items"):
        strict(node.get(key))
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in node.get(key) or []:
            strict(sub)
    return node


def with_defaults(schema, data):
    """What the API server does before validating: drop nulls, fill in defaults."""
    if isinstance(data, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            kind = sub.get("type")
            if key in data and data[key] is None and not (isinstance(kind, list) and "null" in kind):
                del data[key]
            if key not in data and "default" in sub:
                data[key] = copy.deepcopy(sub["default"])
            if key in data:
                with_defaults(sub, data[key])
    elif isinstance(data, list) and isinstance(schema.get("items"), dict):
        for item in data:
            with_defaults(schema["items"], item)


def load_schemas():
    schemas = {}
    directory = os.path.join(ROOT, "deploy", "schemas")
    for name in sorted(os.listdir(directory)):
        if name.endswith(".json"):
            with open(os.path.join(directory, name)) as f:
                schema = json.load(f)
            validator = jsonschema.Draft7Validator(strict(copy.deepcopy(schema)))
            for gvk in schema.get("x-kubernetes-group-version-kind", []):
                schemas[(f"{gvk['group']}/{gvk['version']}", gvk["kind"])] = (schema, validator)
    return schemas


def path_of(error):
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def check(doc, schemas, kube_version):
    """The errors of one document (empty when it is valid)."""
    if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
        return ["not a Kubernetes object: apiVersion and kind are required"]
    key = (str(doc["apiVersion"]), str(doc["kind"]))
    if key in schemas:
        schema, validator = schemas[key]
        doc = copy.deepcopy(doc)
        with_defaults(schema, doc)
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        return [f"{path_of(e)}: {e.message}" for e in errors]
    try:
        kv.validate(doc, kube_version, True)
    except kv.SchemaNotFoundError:
        return [f"unknown kind {key[0]} {key[1]}: no schema in deploy/schemas/ or "
                f"Kubernetes {kube_version}"]
    except kv.ValidationError as e:
        return [f"$.{'.'.join(map(str, e.path))}: {e.message}"]
    return []


def documents(text, label):
    try:
        for i, doc in enumerate(yaml.load_all(text, Loader=Loader), 1):
            if doc is not None:
                yield f"{label}#{i}", doc, None
    except yaml.YAMLError as e:
        yield label, None, " ".join(str(e).split())


def run(command, cwd=ROOT):
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def sources(paths):
    """(label, text) of every manifest: files as they are, kustomizations built, charts
    rendered."""
    for path in paths:
        if os.path.isfile(path):
            with open(path) as f:
                yield os.path.relpath(path, ROOT), f.read()
            continue
        for directory, dirs, names in os.walk(path):
            dirs.sort()
            rel = os.path.relpath(directory, ROOT)
            if os.path.basename(directory) == "schemas":
                continue
            if "Chart.yaml" in names:
                # With its default values, and with each ci/*-values.yaml.
                helm = os.path.join(TOOLS, "helm")
                ci = os.path.join(directory, "ci")
                variants = [[]] + [["-f", os.path.join(ci, n)] for n in
                                   sorted(os.listdir(ci)) if n.endswith("-values.yaml")] \
                    if os.path.isdir(ci) else [[]]
                for values in variants:
                    run([helm, "lint", "--strict", directory, *values])
                    which = f" {os.path.basename(values[1])}" if values else ""
                    yield f"helm template {rel}{which}", run(
                        [helm, "template", "knocker", directory, "--namespace", "knocker", *values])
                dirs.clear()
                continue
            if "kustomization.yaml" in names:
                # What `kubectl apply -k` sends: its resources, with the generated ones.
                yield f"kubectl kustomize {rel}", run(
                    [os.path.join(TOOLS, "kubectl"), "kustomize", directory])
                names = [n for n in names if n.endswith(".example.yaml")]
            for name in sorted(names):
                if name.endswith((".yaml", ".yml")) and name != "kustomization.yaml":
                    with open(os.path.join(directory, name)) as f:
                        yield os.path.join(rel, name), f.read()


# What Envoy gets from the manifests.

def listener(name, http_filters, routes):
    return {"name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM_TYPE, "stat_prefix": name.replace("/", "_"),
                    "route_config": {"virtual_hosts": [
                        {"name": "all", "domains": ["*"], "routes": routes}]},
                    "http_filters": http_filters + [ROUTER]}}]}]}


def bootstrap(listeners, clusters):
    return {"static_resources": {"listeners": listeners, "clusters": clusters},
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 9901}}}}


def local_module(wasm_config):
    """A Wasm filter config with its module as a local file (what the istio-agent or
    Envoy Gateway hands Envoy after fetching it)."""
    wasm_config = copy.deepcopy(wasm_config)
    vm = wasm_config.get("config", {}).get("vm_config", {})
    if "code" in vm:
        vm["code"] = {"local": {"filename": WASM}}
    return wasm_config


def plugin_configs(wasm_config):
    configuration = wasm_config.get("config", {}).get("configuration", {})
    if isinstance(configuration, dict) and "value" in configuration:
        yield configuration["value"]


def from_envoyfilter(doc):
    """The bootstrap an EnvoyFilter's patches amount to, and its plugin configurations."""
    extensions, clusters, filters, route_configs = {}, [], [], {}
    for patch in doc["spec"].get("configPatches", []):
        value = patch.get("patch", {}).get("value", {})
        applies = patch.get("applyTo")
        if applies == "EXTENSION_CONFIG":
            extensions[value["name"]] = value["typed_config"]
        elif applies == "CLUSTER":
            clusters.append(value)
        elif applies == "HTTP_FILTER":
            filters.append(value)
        elif applies == "HTTP_ROUTE":
            route_configs.update(value.get("typed_per_filter_config", {}))
    http_filters = []
    for f in filters:
        if "config_discovery" in f:
            if f["name"] not in extensions:
                raise ValueError(f"HTTP_FILTER {f['name']} discovers a configuration no "
                                 "EXTENSION_CONFIG patch of this EnvoyFilter provides")
            http_filters.append({"name": f["name"], "typed_config": local_module(extensions[f["name"]])})
        else:
            http_filters.append(f)
    for name in route_configs:
        if name not in [f["name"] for f in http_filters]:
            raise ValueError(f"HTTP_ROUTE patch configures {name!r}, which no HTTP_FILTER adds")
    routes = [{"name": "patched", "match": {"prefix": "/"}, "route": {"cluster": clusters[0]["name"]},
               "typed_per_filter_config": route_configs},
              {"match": {"prefix": "/"}, "route": {"cluster": clusters[0]["name"]}}]
    configs = [c for f in http_filters for c in plugin_configs(f.get("typed_config", {}))]
    return bootstrap([listener("envoyfilter", http_filters, routes)], clusters), configs


def json_path_matches(node, name_filter, tail):
    """`$..http_filters[?(@.name=='X')].a.b`: every object reached, recursively."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "http_filters" and isinstance(value, list):
                for f in value:
                    if isinstance(f, dict) and f.get("name") == name_filter:
                        target = f
                        for part in tail:
                            target = target.get(part) if isinstance(target, dict) else None
                        if isinstance(target, dict):
                            found.append(target)
            found += json_path_matches(value, name_filter, tail)
    elif isinstance(node, list):
        for value in node:
            found += json_path_matches(value, name_filter, tail)
    return found


def parse_json_path(expression):
    prefix = "$..http_filters[?(@.name=='"
    if not expression.startswith(prefix) or "')]" not in expression:
        raise ValueError(f"jsonPath {expression!r}: only $..http_filters[?(@.name=='…')].… is understood here")
    name, rest = expression[len(prefix):].split("')]", 1)
    return name, [p for p in rest.split(".") if p]


def from_envoy_gateway(docs):
    """The Gateway's listener as Envoy Gateway generates it for the EnvoyExtensionPolicies
    (one disabled Wasm filter per policy entry, enabled per route), then the
    EnvoyPatchPolicies' JSON patches applied."""
    gateways = [d for d in docs if d["kind"] == "Gateway"]
    listeners, clusters, configs = [], [], []
    for gw in gateways:
        ns, gname = gw["metadata"].get("namespace", "default"), gw["metadata"]["name"]
        for section in gw["spec"]["listeners"]:
            filters, routes = [], []
            for policy in (d for d in docs if d["kind"] == "EnvoyExtensionPolicy"):
                pns, pname = policy["metadata"].get("namespace", "default"), policy["metadata"]["name"]
                for i, wasm in enumerate(policy["spec"].get("wasm", [])):
                    name = f"envoy.filters.http.wasm/envoyextensionpolicy/{pns}/{pname}/wasm/{i}"
                    plugin = json.dumps(wasm.get("config", {}))
                    configs.append(plugin)
                    filters.append({"name": name, "disabled": True, "typed_config": {
                        "@type": WASM_TYPE, "config": {
                            "name": wasm.get("name", ""),
                            "vm_config": {"vm_id": name, "runtime": "envoy.wasm.runtime.v8",
                                          "code": {"local": {"filename": WASM}}},
                            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                                              "value": plugin},
                            "fail_open": bool(wasm.get("failOpen", False))}}})
                    routes.append({"name": f"{pns}/{pname}", "match": {"prefix": f"/{pns}/{pname}"},
                                   "direct_response": {"status": 200},
                                   "typed_per_filter_config": {name: {
                                       "@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                                       "config": {}}}})
            listeners.append(listener(f"{ns}/{gname}/{section['name']}", filters, routes))
    for policy in (d for d in docs if d["kind"] == "EnvoyPatchPolicy"):
        for patch in policy["spec"].get("jsonPatches", []):
            op = patch["operation"]
            if patch["type"].endswith("Cluster") and op["op"] == "add" and op.get("path", "") == "":
                clusters.append(op["value"])
                continue
            if patch["type"].endswith("Listener") and op["op"] == "add" and "jsonPath" in op:
                targets = [l for l in listeners if l["name"] == patch["name"]]
                if not targets:
                    raise ValueError(f"EnvoyPatchPolicy: no listener {patch['name']!r} "
                                     f"(listeners: {[l['name'] for l in listeners]})")
                name, tail = parse_json_path(op["jsonPath"])
                objects = json_path_matches(targets[0], name, tail)
                if not objects:
                    raise ValueError(f"EnvoyPatchPolicy: {op['jsonPath']} matches nothing "
                                     f"in {patch['name']}")
                key = op["path"].strip("/")
                for obj in objects:
                    obj[key] = op["value"]
                continue
            raise ValueError(f"EnvoyPatchPolicy: a patch this check does not apply: {patch}")
    for l in listeners:
        http_filters = l["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        for f in http_filters[:-1]:
            if not f["typed_config"]["config"].get("allow_on_headers_stop_iteration"):
                raise ValueError(f"{l['name']}: the filter {f['name']} lacks "
                                 "allow_on_headers_stop_iteration (EnvoyPatchPolicy)")
        routes = l["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
        routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404}})
    return bootstrap(listeners, clusters), configs


def envoy_bootstraps(doc):
    """Envoy bootstraps held in a ConfigMap's or Secret's data (a key ending in .yaml with
    static_resources)."""
    if doc.get("kind") not in ("ConfigMap", "Secret"):
        return
    for field in ("data", "stringData"):
        for key, value in (doc.get(field) or {}).items():
            if not key.endswith((".yaml", ".yml")):
                continue
            if doc["kind"] == "Secret" and field == "data":
                value = base64.b64decode(value).decode()
            parsed = yaml.safe_load(value)
            if isinstance(parsed, dict) and "static_resources" in parsed:
                yield key, value


def replace_module(text):
    """A bootstrap's Wasm module, wherever it was mounted, as @WASM@."""
    parsed = yaml.safe_load(text)
    for l in parsed.get("static_resources", {}).get("listeners", []):
        for chain in l.get("filter_chains", []):
            for nf in chain.get("filters", []):
                for hf in nf.get("typed_config", {}).get("http_filters", []):
                    if hf.get("typed_config", {}).get("@type") == WASM_TYPE:
                        hf["typed_config"] = local_module(hf["typed_config"])
    return parsed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", default=[os.path.join(ROOT, "deploy")])
    ap.add_argument("--envoy-out", help="write the Envoy bootstraps and plugin configurations here")
    ap.add_argument("-k", "--kubernetes-version", default="1.35",
                    help="Kubernetes version of the built-in kinds (default %(default)s)")
    args = ap.parse_args()
    schemas = load_schemas()
    failed = total = 0
    by_dir = {}
    out_envoy = out_plugin = None
    if args.envoy_out:
        out_envoy = os.path.join(args.envoy_out, "envoy")
        out_plugin = os.path.join(args.envoy_out, "plugin")
        os.makedirs(out_envoy, exist_ok=True)
        os.makedirs(out_plugin, exist_ok=True)

    def emit(name, boot, configs):
        if not out_envoy:
            return
        with open(os.path.join(out_envoy, name + ".yaml"), "w") as f:
            yaml.safe_dump(boot, f, sort_keys=False)
        for i, c in enumerate(configs):
            with open(os.path.join(out_plugin, f"{name}-{i}.json"), "w") as f:
                f.write(c)

    def fail(label, message):
        nonlocal failed
        failed += 1
        print(f"FAIL  {label}: {message}")

    try:
        found = list(sources(args.paths))
    except RuntimeError as e:
        fail("build", e)
        found = []
    for label, text in found:
        built = label.startswith(("kubectl kustomize", "helm template"))
        for doc_label, doc, error in documents(text, label):
            total += 1
            if error:
                fail(doc_label, error)
                continue
            errors = check(doc, schemas, args.kubernetes_version)
            if not isinstance(doc, dict):
                fail(doc_label, errors[0])
                continue
            meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
            what = f"{doc.get('apiVersion')} {doc.get('kind')} " \
                   f"{meta.get('namespace') + '/' if meta.get('namespace') else ''}{meta.get('name')}"
            if errors:
                extra = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
                fail(f"{doc_label}  {what}", errors[0] + extra)
                continue
            print(f"OK    {doc_label}  {what}")
            slug = "".join(c if c.isalnum() or c in "-." else "_" for c in
                           doc_label.replace("kubectl kustomize ", "").replace("deploy/", ""))
            try:
                if doc["kind"] == "EnvoyFilter":
                    emit(slug, *from_envoyfilter(doc))
                elif doc["kind"] == "WasmPlugin":
                    emit_plugin = [json.dumps(doc["spec"].get("pluginConfig", {}))]
                    if out_plugin:
                        with open(os.path.join(out_plugin, slug + ".json"), "w") as f:
                            f.write(emit_plugin[0])
                elif doc["kind"] in ("Gateway", "EnvoyExtensionPolicy", "EnvoyPatchPolicy") and not built:
                    by_dir.setdefault(os.path.dirname(label), []).append(doc)
                for key, boot in envoy_bootstraps(doc):
                    emit(f"{slug}-{key.rsplit('.', 1)[0]}", replace_module(boot),
                         [c for l in replace_module(boot)["static_resources"]["listeners"]
                          for ch in l.get("filter_chains", []) for nf in ch.get("filters", [])
                          for hf in nf.get("typed_config", {}).get("http_filters", [])
                          for c in plugin_configs(hf.get("typed_config", {}))])
            except (KeyError, ValueError, TypeError, IndexError) as e:
                fail(f"{doc_label}  {what}", f"cannot assemble its Envoy configuration: {e}")
    for directory, docs in by_dir.items():
        if any(d["kind"] == "EnvoyExtensionPolicy" for d in docs):
            try:
                emit(os.path.basename(directory), *from_envoy_gateway(docs))
            except (KeyError, ValueError, TypeError, IndexError) as e:
                fail(directory, f"cannot assemble the Envoy Gateway configuration: {e}")
    print(f"{total} documents: {total - failed} ok, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
