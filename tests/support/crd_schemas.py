"""JSON schemas for the custom resources deploy/ emits, which kubernetes-validate has no schema for.

Written for this project from the upstream CRDs' OpenAPI schemas (not copied), and strict where ours are
not: every object rejects fields its CRD does not define, so a misspelt or misplaced field fails here as
the API server would reject it (or, worse, silently drop it). Only the parts of each kind deploy/ uses
are spelt out; a part it does not use is refused until someone writes it down here. Origins:
  monitoring.coreos.com/v1 ServiceMonitor, PodMonitor, PrometheusRule   prometheus-operator v0.80
  postgresql.cnpg.io/v1 Cluster                                        CloudNativePG 1.25 (synchronous.dataDurability)
  keda.sh/v1alpha1 ScaledObject                                        KEDA 2.16
  inference.networking.k8s.io/v1 InferencePool                         Gateway API Inference Extension v1.0
  cert-manager.io/v1 Certificate, Issuer                               cert-manager 1.16
  gateway.networking.k8s.io/v1 Gateway, HTTPRoute                      Gateway API v1.2 (HTTPRoute timeouts: standard)
"""

from __future__ import annotations

from typing import Any

DNS_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        "maxLength": 253}
STRING, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
PROM_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
                                              r"(([0-9]+)s)?(([0-9]+)ms)?)$"}
GATEWAY_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}


def strict(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


def listed(item: dict[str, Any], min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": min_items}


METADATA = strict({"name": NAME, "namespace": DNS_LABEL, "labels": STRING_MAP, "annotations": STRING_MAP},
                  ("name", "namespace"))
LABEL_SELECTOR = strict({"matchLabels": STRING_MAP}, ("matchLabels",))
SECRET_KEY = strict({"name": NAME, "key": STRING, "optional": BOOL}, ("name", "key"))
# The Kubernetes HPA behavior (autoscaling/v2), as KEDA passes it through.
HPA_RULES = strict({"stabilizationWindowSeconds": INT, "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                    "policies": listed(strict({"type": {"enum": ["Pods", "Percent"]}, "value": INT, "periodSeconds": INT},
                                              ("type", "value", "periodSeconds")))})


def resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return strict({"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
                  ("apiVersion", "kind", "metadata", "spec"))


SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): resource("monitoring.coreos.com/v1", "ServiceMonitor", strict({
        "selector": LABEL_SELECTOR,
        "endpoints": listed(strict({
            "port": STRING, "path": STRING, "interval": PROM_DURATION, "scrapeTimeout": PROM_DURATION,
            "authorization": strict({"type": STRING, "credentials": SECRET_KEY}, ("credentials",))}), 1),
    }, ("selector", "endpoints"))),
    ("monitoring.coreos.com/v1", "PodMonitor"): resource("monitoring.coreos.com/v1", "PodMonitor", strict({
        "selector": LABEL_SELECTOR,
        "podMetricsEndpoints": listed(strict({"port": STRING, "path": STRING, "interval": PROM_DURATION}), 1),
    }, ("selector", "podMetricsEndpoints"))),
    ("monitoring.coreos.com/v1", "PrometheusRule"): resource("monitoring.coreos.com/v1", "PrometheusRule", strict({
        "groups": listed(strict({"name": STRING, "rules": listed(strict({
            "alert": STRING, "expr": {"type": "string", "minLength": 1}, "for": PROM_DURATION,
            "labels": STRING_MAP, "annotations": STRING_MAP}, ("alert", "expr")), 1)}, ("name", "rules")), 1),
    }, ("groups",))),
    ("postgresql.cnpg.io/v1", "Cluster"): resource("postgresql.cnpg.io/v1", "Cluster", strict({
        "instances": {"type": "integer", "minimum": 1},
        "imageName": STRING,
        "primaryUpdateStrategy": {"enum": ["unsupervised", "supervised"]},
        "enablePDB": BOOL,
        "priorityClassName": STRING,
        "bootstrap": strict({"initdb": strict({"database": STRING, "owner": STRING, "dataChecksums": BOOL,
                                               "secret": strict({"name": NAME}, ("name",))})}),
        "storage": strict({"size": STRING, "storageClass": STRING}, ("size",)),
        "walStorage": strict({"size": STRING, "storageClass": STRING}, ("size",)),
        "postgresql": strict({
            "parameters": STRING_MAP,
            "synchronous": strict({"method": {"enum": ["any", "first"]}, "number": {"type": "integer", "minimum": 1},
                                   "dataDurability": {"enum": ["required", "preferred"]}}, ("method", "number")),
        }),
        "affinity": strict({"enablePodAntiAffinity": BOOL, "podAntiAffinityType": {"enum": ["preferred", "required"]},
                            "topologyKey": STRING}),
        "resources": strict({"requests": STRING_MAP, "limits": STRING_MAP}),
    }, ("instances", "storage"))),
    ("keda.sh/v1alpha1", "ScaledObject"): resource("keda.sh/v1alpha1", "ScaledObject", strict({
        "scaleTargetRef": strict({"apiVersion": STRING, "kind": STRING, "name": NAME}, ("name",)),
        "minReplicaCount": {"type": "integer", "minimum": 0}, "maxReplicaCount": {"type": "integer", "minimum": 1},
        "pollingInterval": INT, "cooldownPeriod": INT,
        "triggers": listed(strict({"type": STRING, "metadata": STRING_MAP}, ("type", "metadata")), 1),
        "advanced": strict({"horizontalPodAutoscalerConfig": strict({
            "behavior": strict({"scaleUp": HPA_RULES, "scaleDown": HPA_RULES})})}),
    }, ("scaleTargetRef", "triggers"))),
    ("inference.networking.k8s.io/v1", "InferencePool"): resource("inference.networking.k8s.io/v1", "InferencePool", strict({
        "selector": LABEL_SELECTOR,
        "targetPorts": {**listed(strict({"number": PORT}, ("number",)), 1), "maxItems": 1},
        "endpointPickerRef": strict({"group": STRING, "kind": STRING, "name": NAME,
                                     "port": strict({"number": PORT}, ("number",)),
                                     "failureMode": {"enum": ["FailOpen", "FailClose"]}}, ("name",)),
    }, ("selector", "targetPorts", "endpointPickerRef"))),
    ("cert-manager.io/v1", "Certificate"): resource("cert-manager.io/v1", "Certificate", strict({
        "secretName": NAME, "commonName": STRING, "isCA": BOOL, "dnsNames": listed(STRING, 1),
        "duration": GATEWAY_DURATION, "renewBefore": GATEWAY_DURATION,
        "privateKey": strict({"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": INT,
                              "rotationPolicy": {"enum": ["Never", "Always"]}}),
        "usages": listed({"enum": ["server auth", "client auth", "digital signature", "key encipherment",
                                   "cert sign"]}),
        "issuerRef": strict({"name": NAME, "kind": {"enum": ["Issuer", "ClusterIssuer"]}, "group": STRING}, ("name",)),
    }, ("secretName", "issuerRef"))),
    ("cert-manager.io/v1", "Issuer"): resource("cert-manager.io/v1", "Issuer", {
        **strict({"selfSigned": strict({}), "ca": strict({"secretName": NAME}, ("secretName",))}),
        "minProperties": 1, "maxProperties": 1}),
    ("gateway.networking.k8s.io/v1", "Gateway"): resource("gateway.networking.k8s.io/v1", "Gateway", strict({
        "gatewayClassName": NAME,
        "listeners": listed(strict({
            "name": DNS_LABEL, "protocol": {"enum": ["HTTP", "HTTPS", "TLS", "TCP", "UDP"]}, "port": PORT,
            "hostname": STRING,
            "tls": strict({"mode": {"enum": ["Terminate", "Passthrough"]},
                           "certificateRefs": listed(strict({"group": STRING, "kind": STRING, "name": NAME,
                                                             "namespace": DNS_LABEL}, ("name",)), 1)}),
            "allowedRoutes": strict({"namespaces": strict({"from": {"enum": ["All", "Same", "Selector"]}})}),
        }, ("name", "protocol", "port")), 1),
    }, ("gatewayClassName", "listeners"))),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): resource("gateway.networking.k8s.io/v1", "HTTPRoute", strict({
        "parentRefs": listed(strict({"group": STRING, "kind": STRING, "namespace": DNS_LABEL, "name": NAME,
                                     "sectionName": DNS_LABEL, "port": PORT}, ("name",)), 1),
        "hostnames": listed(STRING),
        "rules": listed(strict({
            "matches": listed(strict({"path": strict({"type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                                                      "value": STRING})})),
            "backendRefs": listed(strict({"group": STRING, "kind": STRING, "name": NAME, "namespace": DNS_LABEL,
                                          "port": PORT, "weight": INT}, ("name",))),
            "timeouts": strict({"request": GATEWAY_DURATION, "backendRequest": GATEWAY_DURATION}),
        }), 1),
    }, ("parentRefs", "rules"))),
}
